"""Shared bookkeeping of the three attribution methods: prompt chunks, head groups, work units, results.

Every method cuts its work into *units* whose content does not depend on the number of processes; a unit
writes a block ``[B_chunk, 1 + R, n_metrics]`` of a padded float32 table ``[U, B_max, 1 + R_max, n_metrics]``
(slot 0: the clean scores of its chunk, slots ``1..R``: the CIE of its heads). The table is gathered from
the unit owners (:func:`bkdattr.core.distributed.gather_units`) and unpacked by :func:`assemble`.

Every method (and the means) runs its units through :func:`bkdattr.core.runner.run_units`, supplying only its
per-chunk ``prepare`` and per-unit ``work``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.errors import ConfigError, DataError
from ..core.prompts import check_targets_fit
from ..core.runner import length_order
from .scores import METRICS


@dataclass
class Sweep:
    """Raw output of a method: ``clean[m] [N]`` and ``cie[m] [N, n_heads]`` (heads in the order given),
    NaN for metrics that were not computed; ``info`` holds method details (strategy, checks, ...)."""

    clean: dict[str, torch.Tensor]
    cie: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)


def check_inputs(lm, prompts: Sequence[str], targets: Sequence[str], abar: torch.Tensor,
                 heads: Sequence[tuple[int, int]], batch_size: int) -> None:
    """One-line errors for mismatched or empty inputs."""
    if len(prompts) != len(targets):
        raise DataError(f"{len(prompts)} prompts but {len(targets)} targets; pass one target per prompt")
    if not prompts:
        raise DataError("no clean prompts to attribute over; pass at least one prompt")
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} must be >= 1")
    a = lm.arch
    if tuple(abar.shape) != (a.n_layers, a.n_heads, a.d_model):
        raise ConfigError(f"abar has shape {tuple(abar.shape)}, expected {(a.n_layers, a.n_heads, a.d_model)} "
                          "for this model; recompute it with mean_contributions")
    if not heads:
        raise ConfigError("no heads selected; pass heads=None for all heads")
    for layer, h in heads:
        if not (0 <= layer < a.n_layers and 0 <= h < a.n_heads):
            raise ConfigError(f"head ({layer}, {h}) out of range for {a.n_layers} layers x {a.n_heads} heads")
    check_targets_fit(lm.model, lm.tokenizer, prompts, targets)


def chunks_of(lm, prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Prompt indices in length-sorted chunks of ``batch_size`` (deterministic)."""
    order = length_order(lm.tokenizer, prompts)
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def head_groups(heads: Sequence[tuple[int, int]], per_pass: int | None) -> list[tuple[int, list[int]]]:
    """Group head indices (into ``heads``) by layer, then split each layer into groups of ``per_pass``:
    ``[(layer, [head index, ...]), ...]`` in layer order."""
    by_layer: dict[int, list[int]] = {}
    for i, (layer, _h) in enumerate(heads):
        by_layer.setdefault(int(layer), []).append(i)
    out = []
    for layer in sorted(by_layer):
        idx = by_layer[layer]
        step = per_pass or len(idx)
        if step < 1:
            raise ConfigError(f"heads_per_pass {per_pass} must be >= 1")
        out += [(layer, idx[s:s + step]) for s in range(0, len(idx), step)]
    return out


def new_table(n_units: int, b_max: int, r_max: int) -> torch.Tensor:
    return torch.full((n_units, b_max, 1 + r_max, len(METRICS)), float("nan"), dtype=torch.float32)


def stack_metrics(m: dict[str, torch.Tensor], wanted: Sequence[str]) -> torch.Tensor:
    """``{metric: [...]}`` -> ``[..., n_metrics]`` in :data:`METRICS` order; NaN for unwanted metrics."""
    cols = [m[k].float() if k in wanted else torch.full_like(m[k].float(), float("nan")) for k in METRICS]
    return torch.stack(cols, dim=-1)


def assemble(table: torch.Tensor, units: Sequence[tuple[list[int], list[int]]], n_prompts: int,
             n_heads: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Unpack a gathered table. ``units[u] = (prompt indices, head indices)`` of unit ``u``. Returns
    ``clean {m: [N]}`` and ``cie {m: [N, n_heads]}``."""
    clean = torch.full((n_prompts, len(METRICS)), float("nan"))
    cie = torch.full((n_prompts, n_heads, len(METRICS)), float("nan"))
    for u, (pidx, hidx) in enumerate(units):
        p = torch.tensor(pidx)
        clean[p] = table[u, : len(pidx), 0]
        if hidx:
            cie[p[:, None], torch.tensor(hidx)[None, :]] = table[u, : len(pidx), 1: 1 + len(hidx)]
    return ({m: clean[:, i].clone() for i, m in enumerate(METRICS)},
            {m: cie[..., i].clone() for i, m in enumerate(METRICS)})


