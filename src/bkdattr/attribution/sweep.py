"""Shared bookkeeping of the three attribution methods: prompt chunks, head groups, work units, results.

Every method cuts its work into *units* whose content does not depend on the number of processes; a unit
writes a block ``[B_chunk, 1 + R, n_metrics]`` of a padded float32 table ``[U, B_max, 1 + R_max, n_metrics]``
(slot 0: the clean scores of its chunk, slots ``1..R``: the CIE of its heads). The table is gathered from
the unit owners (:func:`bkdattr.core.distributed.gather_units`) and unpacked by :func:`assemble`.

:func:`run_units` is the one runner every method (and the means) goes through: it shards the units over the
ranks, resumes from a :class:`Checkpoint`, shows progress, runs the method's per-chunk ``prepare`` and
per-unit ``work`` for the units this rank owns, and gathers the table. A method supplies only those two
functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import ConfigError, DataError
from ..core.prompts import check_targets_fit
from .means import length_order
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


class Checkpoint:
    """Resumable unit table: after each finished unit the table and a done-mask are saved (atomically) to
    ``path`` (one file per rank), tagged with ``key`` -- a hash of everything the numbers depend on. A rerun
    with the same key skips the finished units; another key starts afresh. ``path=None`` disables it."""

    def __init__(self, path, key: str, table: torch.Tensor):
        from pathlib import Path

        from ..core.distributed import rank_world

        self.table = table
        self.done = torch.zeros(table.shape[0], dtype=torch.bool)
        self.path = None
        if path is None:
            return
        rank, world = rank_world()
        p = Path(path)
        self.path = p.with_name(f"{p.stem}.rank{rank}of{world}.safetensors")
        self.key = key
        if self.path.is_file():
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(self.path), "pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("key") == key:
                        saved, done = f.get_tensor("table"), f.get_tensor("done").bool()
                        if saved.shape == table.shape:
                            table.copy_(saved)
                            self.done = done
            except (OSError, ValueError, SafetensorError):  # an unreadable checkpoint is ignored and overwritten
                pass

    @property
    def resumed(self) -> int:
        return int(self.done.sum())

    def mark(self, unit: int) -> None:
        self.done[unit] = True
        if self.path is not None:
            from ..core.io import save_tensors

            save_tensors(self.path, {"table": self.table, "done": self.done.to(torch.uint8)},
                         metadata={"key": self.key})

    def finish(self) -> None:
        """Delete the checkpoint file once the result is safely assembled."""
        if self.path is not None and self.path.is_file():
            self.path.unlink()


def run_units(chunk_of: Sequence[int], costs: Sequence[float], table: torch.Tensor,
              work: Callable[[Any, int], torch.Tensor], prepare: Callable[[int], Any] = lambda c: c, *,
              always: Sequence[int] = (), checkpoint=None, checkpoint_key: str = "",
              weights: Sequence[float] | None = None, progress: bool = False, **bar) -> tuple[torch.Tensor, dict]:
    """Run every work unit once over the process group and return ``(gathered table, info)``.

    Unit ``u`` belongs to chunk ``chunk_of[u]`` and costs ``costs[u]`` (load balancing, :func:`assign`).
    For each chunk this rank needs (plus the chunks in ``always``, prepared first on every rank, e.g. to choose
    a strategy the same way everywhere), ``state = prepare(chunk)`` runs once, then ``work(state, u)`` for the
    chunk's units; its result, ``[n0, n1, ...]``, is written to ``table[u, :n0, :n1, ...]``. ``checkpoint``
    (a path) keeps finished units across interruptions (:class:`Checkpoint`, key ``checkpoint_key``).
    ``weights[u]`` advance the progress bar (``bar``: tqdm options). ``info``: ``world_size``,
    ``resumed_units``."""
    from tqdm.auto import tqdm

    from ..core.distributed import assign, gather_units, is_main, rank_world

    rank, world = rank_world()
    owner = assign(costs, world)
    ckpt = Checkpoint(checkpoint, checkpoint_key, table)
    resumed = ckpt.resumed
    mine = [u for u in range(len(chunk_of)) if owner[u] == rank and not ckpt.done[u]]
    weights = weights if weights is not None else [1.0] * len(chunk_of)
    progress_bar = tqdm(total=sum(weights[u] for u in mine), disable=not (progress and is_main()), leave=False, **bar)
    need = list(dict.fromkeys([*always, *sorted({chunk_of[u] for u in mine})]))
    for c in need:
        state = prepare(c)
        for u in mine:
            if chunk_of[u] == c:
                block = work(state, u)
                table[(u, *(slice(0, n) for n in block.shape))] = block
                ckpt.mark(u)
                progress_bar.update(weights[u])
    progress_bar.close()
    table = gather_units(table, owner)
    ckpt.finish()
    return table, {"world_size": world, "resumed_units": resumed}
