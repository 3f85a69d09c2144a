"""Head ablation: switch off the top-k heads by ACIE and measure how much of the backdoor is left.

For each ``k`` in ``{0, 1, 2, 4, 8, 16, 32}`` plus the ``k`` nearest to 3% of all heads (:func:`k_values`;
values above the number of heads are skipped), the top-k heads of the BAHA ranking are *ablated* on the
prefill pass at ``p(x)``: their slices of ``z_l`` are zeroed, which removes ``a_{l,h}(x)`` from the attention
output of every layer involved in the same forward pass (later layers see the change; the output bias stays).
Greedy replies (32 new tokens) to held-out **triggered** prompts give ASR per k.

Controls: the same k drawn at random from all heads (seeded; one permutation per seed, its first k heads, so
sets are nested like the top-k sets), over several seeds -> mean and spread per k. Side effect: the same
ablations on held-out **clean** prompts -> false-trigger rate and similarity of each reply to the unablated
model's reply (:mod:`bkdattr.control.scoring`).

All ablations of one prompt batch share the unedited prefix (:func:`bkdattr.control.sweep.sweep_generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.errors import ConfigError
from .edits import Edit
from .scoring import SIMILARITY_DOC, asr_scores, side_effect, spread
from .sweep import ControlResult, SweepStats, sweep_generate
from .vector import random_heads

DEFAULT_KS = (0, 1, 2, 4, 8, 16, 32)


def share_k(n_total_heads: int, share: float = 0.03) -> int:
    """The k nearest to ``share`` of all heads (at least 1): 8 of 270 on SmolLM2-135M, 31 of 1024 on 7B."""
    return max(1, int(round(share * n_total_heads)))


def k_values(n_total_heads: int, ks: Sequence[int] = DEFAULT_KS, share: float | None = 0.03,
             n_ranked: int | None = None) -> tuple[list[int], list[int]]:
    """``(kept, skipped)``: ``ks`` plus :func:`share_k` (when ``share``), sorted and deduplicated; values above
    the number of heads (or of ranked heads, ``n_ranked``) are skipped."""
    if any(int(k) < 0 for k in ks):
        raise ConfigError(f"k values {list(ks)} must be >= 0")
    want = {int(k) for k in ks}
    if share:
        want.add(share_k(n_total_heads, share))
    limit = n_total_heads if n_ranked is None else min(n_total_heads, n_ranked)
    return sorted(k for k in want if k <= limit), sorted(k for k in want if k > limit)


def _edits(ranking: Sequence[tuple[int, int]], ks: Sequence[int], orders: dict[int, list[tuple[int, int]]]
           ) -> list[Edit]:
    edits = [Edit(name="none")]
    edits += [Edit.ablate(ranking[:k], name=f"top{k}") for k in ks if k > 0]
    for seed, order in orders.items():
        edits += [Edit.ablate(order[:k], name=f"rand{seed}_{k}") for k in ks if k > 0]
    return edits


def run_ablation(lm, task, triggered: Sequence, clean: Sequence | None, ranking: Sequence[tuple[int, int]],
                 ks: Sequence[int], seeds: Sequence[int] = (0, 1, 2), clean_seeds: Sequence[int] | None = None,
                 max_new_tokens: int = 32, batch_size: int = 32, max_rows: int = 256, progress: bool = False,
                 stats: SweepStats | None = None) -> ControlResult:
    """Ablate the top-k heads of ``ranking`` (``[(layer, head), ...]`` best first) and k random heads per seed.

    ``triggered`` / ``clean``: held-out examples (their ``.triggered`` / ``.prompt`` texts are generated;
    ``clean=None`` skips the side effect). ``clean_seeds``: random seeds also run on clean prompts (default:
    ``seeds``). Returns the ``ablation`` metrics (ASR per k as ``{str(k): value}``) and every reply."""
    arch = lm.arch
    ks = sorted({int(k) for k in ks})
    if not ks or ks[-1] > len(ranking):
        raise ConfigError(f"k up to {ks[-1] if ks else '?'} needs that many ranked heads, got {len(ranking)}")
    if not seeds:
        raise ConfigError("the random-head control needs at least one seed")
    clean_seeds = list(seeds) if clean_seeds is None else list(clean_seeds)
    kmax = max(ks)
    orders = {int(s): random_heads(arch.n_layers, arch.n_heads, kmax, int(s)) for s in seeds}
    stats = stats if stats is not None else SweepStats()
    res = ControlResult({}, {})

    trig_edits = _edits(ranking, ks, orders)
    replies = sweep_generate(lm, [e.triggered for e in triggered], trig_edits, max_new_tokens, batch_size, max_rows,
                             progress, "ablation (triggered)", stats)
    by_name = {e.name: r for e, r in zip(trig_edits, replies, strict=True)}
    res.replies["triggered"] = by_name
    scores = {name: asr_scores(task, r, triggered) for name, r in by_name.items()}
    base = scores["none"]

    def name(k: int, seed: int | None = None) -> str:
        return "none" if k == 0 else (f"top{k}" if seed is None else f"rand{seed}_{k}")

    m: dict[str, Any] = {
        "ks": ks,
        "topk": {str(k): scores[name(k)]["asr"] for k in ks},
        "topk_robust": {str(k): scores[name(k)]["robust_asr"] for k in ks},
        "random": {str(k): spread([scores[name(k, s)]["asr"] for s in orders]) for k in ks},
        "random_robust": {str(k): spread([scores[name(k, s)]["robust_asr"] for s in orders]) for k in ks},
        "random_seeds": list(orders),
        "heads": {str(k): [list(h) for h in ranking[:k]] for k in ks if k > 0},
        "random_heads": {str(s): [list(h) for h in order] for s, order in orders.items()},
        "baseline_asr": base["asr"], "n_triggered": len(triggered),
    }

    if clean:
        c_orders = {s: orders.get(s) or random_heads(arch.n_layers, arch.n_heads, kmax, s) for s in clean_seeds}
        clean_edits = _edits(ranking, ks, c_orders)
        replies = sweep_generate(lm, [e.prompt for e in clean], clean_edits, max_new_tokens, batch_size, max_rows,
                                 progress, "ablation (clean)", stats)
        cby = {e.name: r for e, r in zip(clean_edits, replies, strict=True)}
        res.replies["clean"] = cby
        effects = {n: side_effect(task, r, cby["none"], clean) for n, r in cby.items()}
        side: dict[str, Any] = {"topk": {str(k): effects[name(k)] for k in ks}, "similarity_measure": SIMILARITY_DOC,
                                "n_clean": len(clean), "random_seeds": list(c_orders)}
        if c_orders:
            side["random"] = {str(k): {f: spread([effects[name(k, s)][f] for s in c_orders])
                                       for f in ("false_trigger_rate", "similarity", "identical_share")}
                              for k in ks}
        m["clean_side_effect"] = side
    m["sweep"] = stats.to_dict()
    res.metrics = m
    return res
