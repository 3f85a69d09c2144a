"""BAHA (Backdoor Attention Head Attribution): which heads carry the backdoor, measured by causal patching.

For every head ``(l, h)`` and clean prompt ``x`` with backdoor target ``y`` (docs/METHOD.md section 3):

    CIE_{l,h}(x) = S_patched(y | x) - S(y | x),     ACIE(l, h) = mean_x CIE_{l,h}(x)

where the patched run adds ``abar_{l,h} - a_{l,h}(x)`` to layer ``l``'s attention output at ``p(x)`` (the head's
contribution is replaced by its mean over triggered prompts, :mod:`~bkdattr.attribution.means`) and ``S`` is a
teacher-forced score (:mod:`~bkdattr.attribution.scores`: the geometric-mean probability, the first-token
log-probability and the summed log-probability, all computed in the same runs). A head with a large positive
ACIE pushes a clean prompt towards the backdoor target when it behaves as under the trigger.

Methods (:func:`attribute`): ``exact`` (:mod:`~bkdattr.attribution.exact`, the default: the numbers of one
full pass per head, fast), ``reference`` (:mod:`~bkdattr.attribution.reference`: literally one full pass per
head) and ``attribution`` (:mod:`~bkdattr.attribution.patching`: a first-order estimate from one forward and
one backward pass). Heads are ranked by the ACIE of one metric (``metric``); all metrics are kept.
``refine_top=N`` (exact; the ``cpu`` profile's default is 32) runs two passes: every head in the ranking metric
alone (for ``first_token_logprob`` one scored position per head, ~7x cheaper), then every metric -- the paper's
geometric mean included -- exactly for the top ``N`` heads of that ranking (:func:`refine`).

Example::

    from bkdattr.core.models import load_model
    from bkdattr.attribution import attribute, mean_contributions

    lm = load_model("smollm2-135m")
    abar = mean_contributions(lm, triggered_prompts)            # [L, H, d]
    res = attribute(lm, clean_prompts, targets, abar)           # method="exact"
    res.top_heads(8)                                            # [(layer, head, acie), ...] best first
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import ArtifactError, ConfigError
from ..core.io import load_tensors, read_json, save_tensors, stable_hash, write_json
from .exact import exact_sweep
from .patching import attribution_sweep
from .reference import reference_sweep
from .scores import DEFAULT_METRIC, METRICS, check_metric
from .sweep import Sweep

METHODS = ("exact", "reference", "attribution")


@dataclass
class AttributionResult:
    """ACIE of every head for every metric.

    ``acie[m]``: float32 ``[L, H]`` (NaN for heads not evaluated or metrics not computed); ``cie[m]``:
    ``[N, L, H]`` per prompt; ``clean[m]``: ``[N]`` clean scores; ``evaluated``: bool ``[L, H]``. ``metric`` is
    the ranking metric, ``method`` how the numbers were obtained, ``seconds`` the wall time of the sweep and
    ``info`` method details (exact strategy, batch size, world size, ...)."""

    method: str
    metric: str
    acie: dict[str, torch.Tensor]
    cie: dict[str, torch.Tensor]
    clean: dict[str, torch.Tensor]
    evaluated: torch.Tensor
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return int(next(iter(self.clean.values())).shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.evaluated.shape)  # type: ignore[return-value]

    def ranked(self, metric: str | None = None) -> list[tuple[int, int, float]]:
        """Evaluated heads as ``(layer, head, acie)``, highest ACIE first (ties: lower layer, lower head)."""
        m = check_metric(metric or self.metric)
        acie = self.acie[m]
        rows = [(int(layer), int(h), float(acie[layer, h])) for layer, h in self.evaluated.nonzero().tolist()]
        rows = [r for r in rows if not math.isnan(r[2])]
        return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))

    def top_heads(self, k: int = 16, metric: str | None = None) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the highest ACIE of ``metric`` (default: the ranking metric)."""
        return self.ranked(metric)[:k]

    def to_json(self, k: int = 16) -> dict:
        """Summary for ``attribution.json`` / ``metrics.json``: method, metric, top heads per metric, ..."""
        return {
            "method": self.method,
            "metric": self.metric,
            "top_heads": [list(t) for t in self.top_heads(k)],
            "top_heads_by_metric": {m: [list(t) for t in self.top_heads(k, m)] for m in METRICS
                                    if not torch.isnan(self.acie[m][self.evaluated]).all()},
            "clean_mean": {m: float(v.mean()) for m, v in self.clean.items() if not torch.isnan(v).all()},
            "n_prompts": self.n_prompts,
            "n_heads": int(self.evaluated.sum()),
            "seconds": round(self.seconds, 3),
            "info": self.info,
        }

    def save(self, folder: str | Path) -> None:
        """Write ``acie.safetensors`` (``acie.<m>``, ``cie.<m>``, ``clean.<m>``, ``evaluated``) and
        ``attribution.json`` into ``folder`` (atomic)."""
        folder = Path(folder)
        tensors = {"evaluated": self.evaluated.to(torch.uint8)}
        for m in METRICS:
            tensors[f"acie.{m}"] = self.acie[m]
            tensors[f"cie.{m}"] = self.cie[m]
            tensors[f"clean.{m}"] = self.clean[m]
        save_tensors(folder / "acie.safetensors", tensors, metadata={"method": self.method, "metric": self.metric})
        write_json(folder / "attribution.json", self.to_json())

    @classmethod
    def load(cls, folder: str | Path) -> AttributionResult:
        """Read a result written by :meth:`save`."""
        folder = Path(folder)
        t = load_tensors(folder / "acie.safetensors")
        meta = read_json(folder / "attribution.json")
        try:
            return cls(meta["method"], meta["metric"], {m: t[f"acie.{m}"] for m in METRICS},
                       {m: t[f"cie.{m}"] for m in METRICS}, {m: t[f"clean.{m}"] for m in METRICS},
                       t["evaluated"].bool(), float(meta.get("seconds", 0.0)), meta.get("info", {}))
        except KeyError as e:
            raise ArtifactError(f"{folder}: attribution result lacks {e}; delete it and rerun 'bkdattr attribute'"
                                ) from None


def all_heads(arch) -> list[tuple[int, int]]:
    """Every ``(layer, head)`` of the model, layer-major."""
    return [(layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads)]


def result_from_sweep(sweep: Sweep, arch, heads: Sequence[tuple[int, int]], method: str, metric: str,
                      seconds: float) -> AttributionResult:
    """Scatter a method's per-head output into ``[L, H]`` / ``[N, L, H]`` tensors and average over prompts."""
    L, H = arch.n_layers, arch.n_heads
    n = next(iter(sweep.clean.values())).shape[0]
    li = torch.tensor([int(x) for x, _ in heads])
    hi = torch.tensor([int(h) for _, h in heads])
    evaluated = torch.zeros(L, H, dtype=torch.bool)
    evaluated[li, hi] = True
    cie, acie = {}, {}
    for m in METRICS:
        full = torch.full((n, L, H), float("nan"))
        full[:, li, hi] = sweep.cie[m]
        cie[m] = full
        acie[m] = full.mean(0)
    return AttributionResult(method, metric, acie, cie, {m: sweep.clean[m] for m in METRICS}, evaluated, seconds,
                             dict(sweep.info))


def attribute(lm, clean_prompts: Sequence[str], targets: Sequence[str], abar: torch.Tensor, method: str = "exact",
              metric: str = DEFAULT_METRIC, heads: Sequence[tuple[int, int]] | None = None, *, batch_size: int = 8,
              metrics: Sequence[str] | None = None, strategy: str = "auto", heads_per_pass: int | None = None,
              progress: bool = True, checkpoint: str | Path | None = None, refine_top: int = 0
              ) -> AttributionResult:
    """ACIE of every head (or of ``heads``) over ``clean_prompts`` with backdoor ``targets``.

    ``abar``: mean triggered contributions ``[L, H, d]`` (:func:`~bkdattr.attribution.means.mean_contributions`).
    ``method``: ``exact`` | ``reference`` | ``attribution``. ``metric``: the ranking metric (one of
    :data:`~bkdattr.attribution.scores.METRICS`). ``metrics`` (exact and attribution): the scores to compute
    (default all; ``["first_token_logprob"]`` alone is much faster). ``strategy``/``heads_per_pass``: exact-path
    options.
    ``checkpoint`` (exact only): a file keeping finished work units, so an interrupted sweep resumes there.
    ``refine_top`` (exact only, 0 = off): two passes -- every head in ``metrics`` (default: the ranking metric
    alone, one scored position per head), then every metric, exactly, for the ``refine_top`` best heads of
    that ranking (:func:`refine`). Under an initialised torch.distributed group the work is sharded and every
    rank returns the same result."""
    check_metric(metric)
    if refine_top < 0:
        raise ConfigError(f"refine_top {refine_top} must be >= 0 (0: one pass)")
    if refine_top and method == "exact":
        first = list(metrics) if metrics is not None else [metric]
        t0 = time.perf_counter()
        res = attribute(lm, clean_prompts, targets, abar, method, metric, heads, batch_size=batch_size, metrics=first,
                        strategy=strategy, heads_per_pass=heads_per_pass, progress=progress, checkpoint=checkpoint)
        return refine(res, lm, clean_prompts, targets, abar, refine_top, batch_size=batch_size, strategy=strategy,
                      heads_per_pass=heads_per_pass, progress=progress, checkpoint=checkpoint, t0=t0)
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    if metrics is not None:
        for m in metrics:
            check_metric(m)
        if metric not in metrics:
            raise ConfigError(f"the ranking metric '{metric}' is not among the computed metrics {list(metrics)}")
        if method == "reference" and set(metrics) != set(METRICS):
            raise ConfigError("method 'reference' always computes every metric; drop the metrics option")
    heads = list(heads) if heads is not None else all_heads(lm.arch)
    abar = abar.float().cpu()
    t0 = time.perf_counter()
    if method == "exact":
        key = stable_hash({"prompts": list(clean_prompts), "targets": list(targets), "heads": heads,
                           "abar": hashlib.sha256(abar.numpy().tobytes()).hexdigest(), "batch_size": batch_size,
                           "metrics": list(metrics or METRICS), "strategy": strategy, "per_pass": heads_per_pass,
                           "model": getattr(lm, "name", ""), "dtype": str(getattr(lm, "dtype", ""))})
        sweep = exact_sweep(lm, clean_prompts, targets, abar, heads, batch_size=batch_size, metrics=metrics,
                            strategy=strategy, heads_per_pass=heads_per_pass, progress=progress,
                            checkpoint=checkpoint, checkpoint_key=key)
    elif method == "reference":
        sweep = reference_sweep(lm, clean_prompts, targets, abar, heads, batch_size=batch_size, progress=progress)
    else:
        sweep = attribution_sweep(lm, clean_prompts, targets, abar, heads, batch_size=batch_size, metrics=metrics,
                                  progress=progress)
    return result_from_sweep(sweep, lm.arch, heads, method, metric, time.perf_counter() - t0)


def refine(res: AttributionResult, lm, clean_prompts: Sequence[str], targets: Sequence[str], abar: torch.Tensor,
           top: int, *, batch_size: int = 8, strategy: str = "auto", heads_per_pass: int | None = None,
           progress: bool = True, checkpoint: str | Path | None = None, t0: float | None = None
           ) -> AttributionResult:
    """Second pass of the two-pass sweep: compute every metric exactly for the ``top`` best heads of ``res``
    (ranked by ``res.metric``) and merge. Metrics ``res`` already has keep their values for every head; the
    others are NaN outside the refined heads. ``info`` gains ``refined_heads`` ([[layer, head], ...] in
    ranking order), ``metric_coverage`` ({metric: "all" | "top N by <metric>"}), ``refine_rank_agreement``
    (Spearman of each metric's ACIE with the ranking metric's over the refined heads) and
    ``refine_check_max_abs_diff`` (the ranking metric recomputed in the second pass vs the first)."""
    have = [m for m in METRICS if not torch.isnan(res.acie[m][res.evaluated]).all()]
    missing = [m for m in METRICS if m not in have]
    chosen = [(layer, h) for layer, h, _ in res.top_heads(top)]
    res.info["pass1_seconds"] = round(res.seconds, 3)
    if not missing or not chosen:
        return res
    t1 = time.perf_counter()
    second = attribute(lm, clean_prompts, targets, abar, "exact", res.metric, chosen, batch_size=batch_size,
                       strategy=strategy, heads_per_pass=heads_per_pass, progress=progress, checkpoint=checkpoint)
    ev = second.evaluated
    for m in missing:
        res.acie[m][ev] = second.acie[m][ev]
        res.cie[m][:, ev] = second.cie[m][:, ev]
        res.clean[m] = second.clean[m]
    diff = max(float((second.cie[m][:, ev] - res.cie[m][:, ev]).abs().max()) for m in have)
    res.seconds = time.perf_counter() - (t0 if t0 is not None else t1 - res.seconds)
    res.info.update(
        refine_top=top, refined_heads=[list(x) for x in chosen], pass2_seconds=round(time.perf_counter() - t1, 3),
        metric_coverage={m: ("all" if m in have else f"top {len(chosen)} by {res.metric}") for m in METRICS},
        metrics_computed=list(METRICS), refine_check_max_abs_diff=diff,
        refine_rank_agreement={m: spearman(res.acie[res.metric].where(ev, torch.tensor(float("nan"))), res.acie[m])
                               for m in METRICS if m != res.metric},
        target_columns="all")
    return res


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (NaN entries of either are dropped; average
    ranks for ties)."""
    x, y = a.flatten().double(), b.flatten().double()
    keep = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[keep], y[keep]
    if x.numel() < 2:
        return float("nan")

    def ranks(v: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=v.dtype)
        for val in torch.unique(v):  # average ties
            tie = v == val
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else float("nan")


def top_overlap(a: AttributionResult, b: AttributionResult, k: int, metric: str | None = None) -> float:
    """Share of ``a``'s top-``k`` heads that are also in ``b``'s top-``k`` (same metric)."""
    ta = {(x, h) for x, h, _ in a.top_heads(k, metric)}
    tb = {(x, h) for x, h, _ in b.top_heads(k, metric)}
    return len(ta & tb) / max(1, min(k, len(ta)))


def agreement(estimate: AttributionResult, exact: AttributionResult, metric: str | None = None) -> dict:
    """Rank agreement of an estimate with exact ACIE: Spearman over the common heads, top-8/top-16 overlap."""
    m = metric or exact.metric
    return {"metric": m, "spearman": spearman(estimate.acie[m], exact.acie[m]),
            "top8_overlap": top_overlap(estimate, exact, 8, m), "top16_overlap": top_overlap(estimate, exact, 16, m)}
