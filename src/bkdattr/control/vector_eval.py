"""Evaluating the Backdoor Vector: layer sweep on the validation split, report on the test split.

1. **Layer sweep (val).** For every layer ``l`` (optionally every ``layer_stride``-th), ``+alpha*v`` at
   ``p(x)`` on clean prompts (activation ASR) and ``-alpha*v`` on triggered prompts (ASR left after
   neutralisation), with the same for random vectors of the same norm (one per seed, the same direction at
   every layer) as the control.
2. **Best layer (val).** ``select_by="specific"`` (default) maximises the effect beyond the random control,
   ``(random_subtract - subtract) + (add - random_add)``, so a layer where any large perturbation breaks the
   model does not win; ``"subtract"`` minimises the subtract ASR; ``"add"`` maximises the add ASR. Ties go to
   the lower subtract ASR, then the lower layer.
3. **Test at the best layer.** Add / subtract ``v``, the random vectors and the vector of k random heads; the
   side effect of subtracting on clean prompts (false-trigger rate, similarity to unedited replies); the
   dose-response curve ASR vs alpha for ``v`` and a same-norm random vector, both directions.

All edits of one split run in one :func:`bkdattr.control.sweep.sweep_generate` call (shared prefix).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.forward import captured_pass
from ..core.hooks import capture_attention_output, capture_features
from .edits import Edit
from .scoring import SIMILARITY_DOC, asr_scores, side_effect, spread
from .sweep import ControlResult, SweepStats, sweep_generate
from .vector import random_like

SELECT_BY = ("specific", "subtract", "add")


def residual_norms(lm, prompts: Sequence[str], batch_size: int = 16) -> dict[str, list[float]]:
    """Mean L2 norm at ``p(x)`` of the residual stream entering each layer and of each layer's attention
    output over ``prompts``: ``{"residual": [L], "attention_output": [L]}`` (scale for ``|v|``)."""
    arch = lm.arch
    res = torch.zeros(arch.n_layers)
    att = torch.zeros(arch.n_layers)

    @contextlib.contextmanager
    def capture(b):
        with capture_features(arch, b.last_pos, "residual") as r, capture_attention_output(arch, b.last_pos) as a:
            yield r, a

    for s in range(0, len(prompts), batch_size):
        _, (r, a) = captured_pass(lm, prompts[s: s + batch_size], capture)
        for layer in range(arch.n_layers):
            res[layer] += r[layer].norm(dim=-1).sum().cpu()
            att[layer] += a[layer].norm(dim=-1).sum().cpu()
    n = max(1, len(prompts))
    return {"residual": (res / n).tolist(), "attention_output": (att / n).tolist()}


def _fmt(a: float) -> str:
    return f"{a:g}"


def choose_layer(add: dict[int, float], sub: dict[int, float], radd: dict[int, float], rsub: dict[int, float],
                 select_by: str = "specific") -> int:
    """The best layer of a validation sweep (see the module docstring for the rules)."""
    if select_by not in SELECT_BY:
        raise ConfigError(f"unknown select_by '{select_by}'; use one of {', '.join(SELECT_BY)}")

    def score(layer: int) -> float:
        if select_by == "subtract":
            return -sub[layer]
        if select_by == "add":
            return add[layer]
        return (rsub[layer] - sub[layer]) + (add[layer] - radd[layer])

    return min(sub, key=lambda layer: (-score(layer), sub[layer], layer))


def run_vector_experiment(lm, task, val: Sequence, test: Sequence, v: torch.Tensor, layers: Sequence[int],
                          alpha: float = 1.0, random_seeds: Sequence[int] = (0,),
                          random_heads_vector: torch.Tensor | None = None,
                          dose_alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0), select_by: str = "specific",
                          max_new_tokens: int = 32, batch_size: int = 32, max_rows: int = 256,
                          progress: bool = False, stats: SweepStats | None = None) -> ControlResult:
    """Layer sweep of ``v`` (float32 ``[d_model]``) on ``val`` examples, then the best layer on ``test``.

    ``random_seeds``: same-norm random vectors (:func:`random_like`); ``random_heads_vector``: the control
    built from k random heads (test only); ``dose_alphas``: the dose-response grid (test, best layer)."""
    if not layers:
        raise ConfigError("no layers to sweep; check layers / layer_stride")
    if not random_seeds:
        raise ConfigError("the random-vector control needs at least one seed")
    stats = stats if stats is not None else SweepStats()
    v = v.detach().float().reshape(-1)
    rand = {int(s): random_like(v, 10_000 + int(s)) for s in random_seeds}
    out = ControlResult({}, {})

    # ---- 1. layer sweep on val
    c_edits = [Edit(name="none")] + [Edit.add(lay, v, alpha, f"add_L{lay}") for lay in layers]
    t_edits = [Edit(name="none")] + [Edit.add(lay, v, -alpha, f"sub_L{lay}") for lay in layers]
    for s, r in rand.items():
        c_edits += [Edit.add(lay, r, alpha, f"radd{s}_L{lay}") for lay in layers]
        t_edits += [Edit.add(lay, r, -alpha, f"rsub{s}_L{lay}") for lay in layers]
    vc = _run(lm, [e.prompt for e in val], c_edits, max_new_tokens, batch_size, max_rows, progress,
              "vector val (clean)", stats)
    vt = _run(lm, [e.triggered for e in val], t_edits, max_new_tokens, batch_size, max_rows, progress,
              "vector val (triggered)", stats)
    out.replies["val_clean"], out.replies["val_triggered"] = vc, vt
    sc = {n: asr_scores(task, r, val) for n, r in vc.items()}
    st = {n: asr_scores(task, r, val) for n, r in vt.items()}
    add = {lay: sc[f"add_L{lay}"]["asr"] for lay in layers}
    sub = {lay: st[f"sub_L{lay}"]["asr"] for lay in layers}
    radd_s = {lay: spread([sc[f"radd{s}_L{lay}"]["asr"] for s in rand]) for lay in layers}
    rsub_s = {lay: spread([st[f"rsub{s}_L{lay}"]["asr"] for s in rand]) for lay in layers}
    radd = {lay: radd_s[lay]["mean"] for lay in layers}
    rsub = {lay: rsub_s[lay]["mean"] for lay in layers}
    best = choose_layer(add, sub, radd, rsub, select_by)

    # ---- 2. test at the best layer: main edits, controls, clean side effect, dose-response
    alphas = sorted({float(a) for a in dose_alphas} | {float(alpha), 0.0})
    r0 = rand[min(rand)]
    tc: dict[str, Edit] = {"none": Edit(name="none")}
    tt: dict[str, Edit] = {"none": Edit(name="none")}
    for a in alphas:
        if a == 0.0:
            continue
        tc[f"v+{_fmt(a)}"] = Edit.add(best, v, a, f"v+{_fmt(a)}")
        tc[f"r{min(rand)}+{_fmt(a)}"] = Edit.add(best, r0, a, f"r{min(rand)}+{_fmt(a)}")
        tt[f"v-{_fmt(a)}"] = Edit.add(best, v, -a, f"v-{_fmt(a)}")
        tt[f"r{min(rand)}-{_fmt(a)}"] = Edit.add(best, r0, -a, f"r{min(rand)}-{_fmt(a)}")
    for s, r in rand.items():
        tc.setdefault(f"r{s}+{_fmt(alpha)}", Edit.add(best, r, alpha, f"r{s}+{_fmt(alpha)}"))
        tt.setdefault(f"r{s}-{_fmt(alpha)}", Edit.add(best, r, -alpha, f"r{s}-{_fmt(alpha)}"))
        tc[f"clean_r{s}-{_fmt(alpha)}"] = Edit.add(best, r, -alpha, f"clean_r{s}-{_fmt(alpha)}")
    tc[f"clean_v-{_fmt(alpha)}"] = Edit.add(best, v, -alpha, f"clean_v-{_fmt(alpha)}")
    if random_heads_vector is not None:
        tc["rh+"] = Edit.add(best, random_heads_vector, alpha, "rh+")
        tt["rh-"] = Edit.add(best, random_heads_vector, -alpha, "rh-")
    xc = _run(lm, [e.prompt for e in test], list(tc.values()), max_new_tokens, batch_size, max_rows, progress,
              "vector test (clean)", stats)
    xt = _run(lm, [e.triggered for e in test], list(tt.values()), max_new_tokens, batch_size, max_rows, progress,
              "vector test (triggered)", stats)
    out.replies["test_clean"], out.replies["test_triggered"] = xc, xt
    tsc = {n: asr_scores(task, r, test) for n, r in xc.items()}
    tst = {n: asr_scores(task, r, test) for n, r in xt.items()}

    def dose(direction: str, which: str) -> list[float]:
        vals = []
        for a in alphas:
            if a == 0.0:
                vals.append((tsc if direction == "add" else tst)["none"]["asr"])
            elif direction == "add":
                vals.append(tsc[f"{which}+{_fmt(a)}"]["asr"])
            else:
                vals.append(tst[f"{which}-{_fmt(a)}"]["asr"])
        return vals

    a_s = _fmt(alpha)
    m: dict[str, Any] = {
        "alpha": float(alpha), "layers": list(layers), "select_by": select_by,
        "add": {str(k): x for k, x in add.items()},
        "subtract": {str(k): x for k, x in sub.items()},
        "random_add": {str(k): x for k, x in radd.items()},
        "random_subtract": {str(k): x for k, x in rsub.items()},
        "add_robust": {str(lay): sc[f"add_L{lay}"]["robust_asr"] for lay in layers},
        "subtract_robust": {str(lay): st[f"sub_L{lay}"]["robust_asr"] for lay in layers},
        "random_add_spread": {str(k): x for k, x in radd_s.items()},
        "random_subtract_spread": {str(k): x for k, x in rsub_s.items()},
        "random_seeds": list(rand),
        "baseline_val": {"clean_false_trigger_rate": sc["none"]["asr"], "triggered_asr": st["none"]["asr"]},
        "best_layer": int(best),
        "test_asr_at_best_layer": {
            "add": tsc[f"v+{a_s}"]["asr"], "subtract": tst[f"v-{a_s}"]["asr"],
            "add_robust": tsc[f"v+{a_s}"]["robust_asr"], "subtract_robust": tst[f"v-{a_s}"]["robust_asr"],
            "baseline_clean": tsc["none"]["asr"], "baseline_triggered": tst["none"]["asr"],
        },
        "random_test_asr_at_best_layer": {
            "add": spread([tsc[f"r{s}+{a_s}"]["asr"] for s in rand])["mean"],
            "subtract": spread([tst[f"r{s}-{a_s}"]["asr"] for s in rand])["mean"],
            "add_spread": spread([tsc[f"r{s}+{a_s}"]["asr"] for s in rand]),
            "subtract_spread": spread([tst[f"r{s}-{a_s}"]["asr"] for s in rand]),
        },
        "clean_side_effect": {
            "layer": int(best), "split": "test", "direction": "subtract", "similarity_measure": SIMILARITY_DOC,
            "vector": side_effect(task, xc[f"clean_v-{a_s}"], xc["none"], test),
            "random": {f: spread([side_effect(task, xc[f"clean_r{s}-{a_s}"], xc["none"], test)[f] for s in rand])
                       for f in ("false_trigger_rate", "similarity", "identical_share")},
            "add_vector": side_effect(task, xc[f"v+{a_s}"], xc["none"], test),
        },
        "dose_response": {
            "layer": int(best), "split": "test", "alphas": alphas, "random_seed": min(rand),
            "add": {"vector": dose("add", "v"), "random": dose("add", f"r{min(rand)}")},
            "subtract": {"vector": dose("sub", "v"), "random": dose("sub", f"r{min(rand)}")},
        },
        "n_val": len(val), "n_test": len(test),
    }
    if random_heads_vector is not None:
        m["random_heads_test_asr_at_best_layer"] = {"add": tsc["rh+"]["asr"], "subtract": tst["rh-"]["asr"],
                                                    "norm": float(random_heads_vector.float().norm())}
    m["sweep"] = stats.to_dict()
    out.metrics = m
    return out


def _run(lm, prompts, edits, max_new_tokens, batch_size, max_rows, progress, desc, stats) -> dict[str, list[str]]:
    names = [e.name for e in edits]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate edit names in {desc}")
    replies = sweep_generate(lm, prompts, edits, max_new_tokens, batch_size, max_rows, progress, desc, stats)
    return dict(zip(names, replies, strict=True))
