"""The ``guard`` row of the defences table: the probe-gated guard (:mod:`bkdattr.disarm.runtime`) measured like every
other defence, plus what only a guard has.

* **Defence figures** (:func:`bkdattr.disarm.utility.defence_figures`, the same code as for ``heads`` and
  ``vector``): test ASR, near-trigger ASR, false-trigger rate, clean metric, reference-reply perplexity ratio
  and changed-reply share, all measured with the model inside ``with guard:``. The teacher-forced perplexity
  pass holds prompt + reply in one prefill; the guard reads and edits the *prompt's* last position there (it
  finds the end of the assistant header in each row), so a flagged clean prompt costs what it would cost a
  generation.
* **Detection**: ``true_positive_rate`` (share of triggered held-out prompts with ``P(triggered) > threshold``)
  and ``false_positive_rate`` (the same on the clean prompts), with the guard's own feature pass.
* **Overhead**: ``t_guard / t_plain - 1`` for generating the clean held-out replies (the same batches, in the
  same process, interleaved; the fastest of ``repeats`` timings of each, after one untimed warm-up).
"""

from __future__ import annotations

import time
from typing import Any

from ..core.generation import generate
from ..core.rundir import RunDir
from ..inject.data import load_splits
from ..inject.evaluate import EvalConfig, held_out
from .runtime import Guard
from .utility import defence_figures


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def guard_overhead(lm, guard: Guard, prompts: list[str], cfg: EvalConfig, repeats: int = 2) -> dict[str, float]:
    """Seconds to generate replies to ``prompts`` without and with ``guard`` (best of ``repeats`` each,
    interleaved, after a warm-up) and ``overhead = t_guard / t_plain - 1``."""
    def gen() -> None:
        generate(lm, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=False)

    def guarded() -> None:
        with guard:
            gen()

    gen()  # warm-up: allocator, kernels, tokenizer caches
    plain, with_guard = [], []
    for _ in range(max(1, repeats)):
        plain.append(_timed(gen))
        with_guard.append(_timed(guarded))
    t0, t1 = min(plain), min(with_guard)
    return {"overhead": t1 / t0 - 1.0, "t_plain_s": round(t0, 4), "t_guard_s": round(t1, 4),
            "guard_s_per_prompt": round(max(t1 - t0, 0.0) / max(len(prompts), 1), 6)}


def evaluate_guard(run: RunDir | str, lm, cfg: EvalConfig, baseline: dict[str, Any] | None,
                   guard: Guard | None = None, action: str = "vector", progress: bool = False,
                   repeats: int = 2) -> dict[str, Any]:
    """The ``metrics.disarm.guard`` figures of ``run``'s guard on ``lm`` (built with ``action`` unless
    ``guard`` is given): :func:`defence_figures` under the guard (``baseline``: the undefended result of
    :func:`defence_figures`), ``true_positive_rate`` / ``false_positive_rate`` of the detection on the held-out
    split's triggered / clean prompts, ``overhead`` and the guard's plan (probe layer, threshold, edit).
    ``clean_replies`` is not returned (the defended replies differ from the baseline's in
    ``changed_reply_share`` only)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    guard = guard if guard is not None else Guard(lm, run, action)
    splits = load_splits(run)
    examples = held_out(splits, cfg)
    n_flagged0 = guard.n_flagged
    with guard:
        out = defence_figures(lm, splits, cfg, baseline, progress)
    out.pop("clean_replies", None)
    flagged_during_eval = guard.n_flagged - n_flagged0
    thr = guard.threshold
    trig = guard.scores([e.triggered for e in examples], progress)
    clean = guard.scores([e.prompt for e in examples], progress)
    out.update(true_positive_rate=float((trig > thr).mean()) if len(trig) else None,
               false_positive_rate=float((clean > thr).mean()) if len(clean) else None,
               n_detection=len(examples), flagged_prefill_rows=flagged_during_eval)
    out.update(guard_overhead(lm, guard, [e.prompt for e in examples], cfg, repeats))
    out["guard"] = guard.plan.to_dict()
    return out
