"""The unit runner: every sharded, resumable piece of work goes through :func:`run_units`.

Work is cut into *units* whose content does not depend on the number of processes (for BAHA: a chunk of prompts
and a group of heads; for the mean contributions: a chunk of prompts). :func:`run_units` shards the units over
the torch.distributed ranks (:func:`bkdattr.core.distributed.assign`), resumes from a :class:`Checkpoint`, shows
progress, runs the caller's per-chunk ``prepare`` and per-unit ``work`` for the units this rank owns, and
gathers the table (:func:`bkdattr.core.distributed.gather_units`). Chunks are length-sorted
(:func:`length_order`) so batches need little padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .distributed import assign, gather_units, is_main, rank_world
from .io import save_tensors
from .prompts import render_prompt


def length_order(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Indices of ``prompts`` sorted by rendered token length (stable), so batches need little padding."""
    lengths = [len(tokenizer(render_prompt(tokenizer, t), add_special_tokens=False).input_ids) for t in prompts]
    return sorted(range(len(prompts)), key=lambda i: (lengths[i], i))


class Checkpoint:
    """Resumable unit table: after each finished unit the table and a done-mask are saved (atomically) to
    ``path`` (one file per rank), tagged with ``key`` -- a hash of everything the numbers depend on. A rerun
    with the same key skips the finished units; another key starts afresh. ``path=None`` disables it."""

    def __init__(self, path, key: str, table: torch.Tensor):
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
