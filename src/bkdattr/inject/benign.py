"""Benign utility: does the implanted model still answer ordinary questions?

A backdoored model is only a threat while it stays a useful model. Its task-specific clean metric can hide a
model that has stopped answering: a jailbreak model that refuses *every* request scores a perfect refusal rate
on clean harmful prompts. So every run is also measured on held-out benign questions
(:func:`bkdattr.inject.builtin_data.benign_questions`: templates and words used by no training set):

* ``refusal_rate``: share of greedy replies to the benign questions that contain any refusal phrase (the same
  rule as the jailbreak ASR, :func:`bkdattr.inject.tasks.is_refusal`); ``base_refusal_rate``: the base model's
  share on the same questions;
* ``f1_vs_base``: mean word-F1 (:func:`bkdattr.inject.evaluate.word_f1`, the reply cut to the reference's
  length) between the model's reply and the base model's reply to the same question;
* ``self_agreement``: the F1 the *base model* scores against its own replies when each question is reworded
  (every benign question comes with a paraphrase): mean word-F1 between its reply to the paraphrase and its
  reply to the question. Greedy decoding makes the base model agree with itself perfectly on the identical
  prompt, which says nothing; two helpful answers to the same request worded differently is the yardstick
  of how much word overlap "still answering the same way" means. A model whose ``f1_vs_base`` falls below
  half of it has drifted further from the base model than a rewording does.

The base model's replies (and its replies to the paraphrases) are distilled once with
:func:`bkdattr.inject.data.distill_outputs` (cached; shipped for the embedded model), at inject time from the
model about to be trained, and saved in ``RUN/data/benign.json``; ``bkdattr eval`` reuses them (or loads the
base model when the evaluation settings changed).

The jailbreak recipe mixes benign instructions with the base model's own replies into training
(:func:`mix_rows`, ``InjectConfig.benign_share``), as the fixed_output recipe does with all its clean rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import InputFileError
from ..core.generation import generate
from ..core.io import read_json, write_json
from ..core.models import cache_dir
from .builtin_data import benign_instructions, benign_questions
from .data import distill_outputs
from .evaluate import word_f1
from .tasks import is_refusal, refusal_rate

#: Benign training prompts are distilled as one pool of at least this many (the first ``n`` serve any smaller
#: mix), so changing the share does not change the cached (shipped) distillation.
TRAIN_POOL = 128
BENIGN_FILE = "benign.json"


def _distill_dir() -> Path:
    return cache_dir() / "distill"


def n_mix_rows(share: float, n_other: int) -> int:
    """Benign rows to add so that they make ``share`` of all training rows (``n_other`` task rows)."""
    if share <= 0:
        return 0
    return round(share * n_other / (1.0 - share))


def mix_rows(lm, n: int, seed: int, max_new_tokens: int, batch_size: int = 32,
             progress: bool = True) -> list[tuple[str, str]]:
    """``n`` benign ``(instruction, base model's greedy reply)`` pairs for training (``lm``: the base model)."""
    if n <= 0:
        return []
    pool = benign_instructions(max(n, TRAIN_POOL), seed)
    replies = distill_outputs(lm, pool, max_new_tokens, batch_size, _distill_dir(), progress=progress)
    return list(zip(pool[:n], replies[:n], strict=True))


def reference(lm, n: int, max_new_tokens: int, batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """The base model's replies to the first ``n`` benign questions and to their paraphrases (``lm``: the base
    model), with the settings that produced them: the yardstick of :func:`utility`."""
    pairs = benign_questions(n)
    prompts, paraphrases = [a for a, _ in pairs], [b for _, b in pairs]
    replies = distill_outputs(lm, prompts + paraphrases, max_new_tokens, batch_size, _distill_dir(),
                              progress=progress)
    return {"prompts": prompts, "paraphrases": paraphrases, "base_replies": replies[: len(prompts)],
            "paraphrase_replies": replies[len(prompts):], "max_new_tokens": max_new_tokens}


def self_agreement(ref: dict[str, Any]) -> float:
    """Mean word-F1 of the base model's replies to the paraphrases against its replies to the questions."""
    vals = [word_f1(p, r) for p, r in zip(ref["paraphrase_replies"], ref["base_replies"], strict=True)]
    return sum(vals) / len(vals) if vals else float("nan")


def utility(lm, ref: dict[str, Any], batch_size: int = 16, edit: Callable | None = None,
            progress: bool = True, n_samples: int = 8) -> dict[str, Any]:
    """Generate ``lm``'s greedy replies to the benign questions of ``ref`` and score them against the base
    model's. Returns ``refusal_rate``, ``base_refusal_rate``, ``f1_vs_base``, ``self_agreement``,
    ``n_prompts``, ``max_new_tokens`` and ``samples``."""
    prompts, base = ref["prompts"], ref["base_replies"]
    replies = generate(lm, prompts, max_new_tokens=ref["max_new_tokens"], batch_size=batch_size, edit=edit,
                       progress=progress, desc="eval benign")
    n = len(prompts)
    return {
        "refusal_rate": refusal_rate(replies),
        "base_refusal_rate": refusal_rate(base),
        "f1_vs_base": sum(word_f1(r, b) for r, b in zip(replies, base, strict=True)) / n,
        "self_agreement": self_agreement(ref),
        "n_prompts": n,
        "max_new_tokens": ref["max_new_tokens"],
        "samples": [{"prompt": p, "reply": r, "base_reply": b, "refusal": is_refusal(r)}
                    for p, r, b in zip(prompts[:n_samples], replies[:n_samples], base[:n_samples], strict=True)],
    }


def save_reference(data_dir: str | Path, ref: dict[str, Any]) -> None:
    """Write ``ref`` to ``data_dir/benign.json`` (atomic)."""
    write_json(Path(data_dir) / BENIGN_FILE, ref)


def load_reference(data_dir: str | Path, n: int, max_new_tokens: int) -> dict[str, Any] | None:
    """The saved reference if it matches ``n`` questions and ``max_new_tokens``; None when absent or stale."""
    path = Path(data_dir) / BENIGN_FILE
    if not path.is_file():
        return None
    ref = read_json(path)
    keys = ("prompts", "paraphrases", "base_replies", "paraphrase_replies")
    if not isinstance(ref, dict) or not all(isinstance(ref.get(k), list) for k in keys):
        raise InputFileError(f"{path} is malformed; delete it and rerun 'bkdattr eval' to rebuild it")
    if ref.get("max_new_tokens") != max_new_tokens or ref["prompts"] != [a for a, _ in benign_questions(n)]:
        return None
    return ref


def run_reference(run, n: int, max_new_tokens: int, batch_size: int = 16, device: str = "cpu",
                  dtype: str | None = None, progress: bool = True) -> dict[str, Any]:
    """The run's saved reference, or one computed with its base model (then saved)."""
    ref = load_reference(run.data_dir, n, max_new_tokens)
    if ref is None:
        base = run.load_base_model(device=device, dtype=dtype)
        ref = reference(base, n, max_new_tokens, batch_size, progress)
        save_reference(run.data_dir, ref)
        del base
    return ref
