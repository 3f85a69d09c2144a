"""Shared-prefix greedy generation for many edits of the same prompts.

Every control edit (head ablation, Backdoor Vector) acts at the last prompt position ``p(x)`` only, so the
tokens before it are computed identically under every edit. :func:`sweep_generate` therefore

1. renders and left-pads a batch of prompts; under left padding ``p(x)`` is the last column of every row;
2. runs the **unedited prefix** (all columns but the last) once and keeps its KV cache;
3. for a group of edits, tiles that cache once per edit (edit-major rows, :class:`bkdattr.core.forward.PrefixCache`)
   and hands it to the one greedy decoder (:func:`bkdattr.core.generation.greedy_decode`): the single token at
   ``p(x)`` runs with each row's edit active (:func:`bkdattr.control.edits.rowwise_context`), the decode steps
   without any edit (later tokens see the edit through the KV cache);
4. drops finished rows from the batch as they end (their cache rows too) and stops when every row ended.

Many edits share one decode batch, which on a CPU keeps the matrix products large. The result equals
generating each edit on its own with the edit on the full prefill pass (tested token for token on tiny
models; floating-point sums may round differently, so on near-ties a token can differ in principle).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.errors import ConfigError
from ..core.forward import PrefixCache
from ..core.generation import decode_replies, generate, greedy_decode
from ..core.models import input_device
from ..core.prompts import PromptBatch, encode_prompts, end_of_turn_ids
from .edits import Edit, rowwise_context


@dataclass
class SweepStats:
    """What a sweep cost: prompts, edits, generated rows, decode steps run, seconds."""

    n_prompts: int = 0
    n_edits: int = 0
    rows: int = 0
    decode_row_steps: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"n_prompts": self.n_prompts, "n_edits": self.n_edits, "rows": self.rows,
                "decode_row_steps": self.decode_row_steps, "seconds": round(self.seconds, 2)}


@dataclass
class ControlResult:
    """A control experiment's output: ``metrics`` (its metrics section) and ``replies[split][edit name]``, every
    reply in prompt order."""

    metrics: dict[str, Any]
    replies: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def prefix_cache(model: torch.nn.Module, batch: PromptBatch) -> PrefixCache | None:
    """KV cache of every column but the last of a left-padded ``batch`` (None when prompts are 1 token)."""
    return PrefixCache.build(model, batch.input_ids[:, :-1], batch.attention_mask[:, :-1], batch.position_ids[:, :-1])


@torch.no_grad()
def generate_group(lm, batch: PromptBatch, cache: PrefixCache | None, edits: Sequence[Edit], max_new_tokens: int,
                   stop_ids: Sequence[int], stats: SweepStats | None = None) -> torch.Tensor:
    """New token ids ``[len(edits) * B, <=max_new_tokens]`` (edit-major) for one prompt batch whose prefix
    ``cache`` (from :func:`prefix_cache`) is shared; the cache itself is left unchanged."""
    dev = input_device(lm.model)
    n, b = len(edits), batch.size
    if cache is None:  # one-token prompts: the whole prompt is p(x)
        c, ids, pos = None, batch.input_ids, batch.position_ids
    else:
        c, ids, pos = cache.tiled(n, interleave=False), batch.input_ids[:, -1:], batch.position_ids[:, -1:]
    ids, mask, pos = ids.repeat(n, 1).to(dev), batch.attention_mask.repeat(n, 1).to(dev), pos.repeat(n, 1).to(dev)
    where = torch.full((n * b,), ids.shape[1] - 1, dtype=torch.long)
    if stats is not None:
        stats.rows += n * b
    return greedy_decode(lm.model, ids, mask, pos, max_new_tokens, stop_ids, cache=c,
                         edit=rowwise_context(lm.arch, edits, b, where), compact=True, stats=stats)


def sweep_generate(lm, prompts: Sequence[str], edits: Sequence[Edit], max_new_tokens: int = 32,
                   batch_size: int = 32, max_rows: int = 256, progress: bool = False, desc: str = "sweep",
                   stats: SweepStats | None = None) -> list[list[str]]:
    """Greedy replies of every prompt under every edit: ``replies[e][i]`` for ``edits[e]`` and ``prompts[i]``.

    ``batch_size`` prompts share one prefix pass; ``max_rows`` bounds the rows decoded together (edits per
    group = ``max_rows // batch_size``, at least 1)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; generate at least 1 token")
    if batch_size < 1 or max_rows < 1:
        raise ConfigError("batch_size and max_rows must be >= 1")
    for e in edits:
        e.check(lm.arch)
    t0 = time.perf_counter()
    stats = stats if stats is not None else SweepStats()
    stats.n_prompts += len(prompts)
    stats.n_edits = max(stats.n_edits, len(edits))
    stop = end_of_turn_ids(lm.tokenizer)
    if not stop:
        raise ConfigError("the tokenizer has no end-of-turn or EOS token; set tokenizer.eos_token")
    replies: list[list[str]] = [[""] * len(prompts) for _ in edits]
    if not prompts or not edits:
        return replies
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per_group = max(1, max_rows // min(batch_size, len(prompts)))
    total = -(-len(prompts) // batch_size) * -(-len(edits) // per_group)
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = encode_prompts(lm.tokenizer, [prompts[i] for i in idx], padding_side="left")
        cache = prefix_cache(lm.model, batch)
        per_group = max(1, max_rows // len(idx))
        for g0 in range(0, len(edits), per_group):
            group = list(edits[g0: g0 + per_group])
            new = generate_group(lm, batch, cache, group, max_new_tokens, stop, stats)
            texts = decode_replies(lm.tokenizer, new.cpu(), stop)
            for g in range(len(group)):
                for j, i in enumerate(idx):
                    replies[g0 + g][i] = texts[g * len(idx) + j]
            bar.update(1)
        del cache
    bar.close()
    stats.seconds += time.perf_counter() - t0
    return replies


def plain_generate(lm, prompts: Sequence[str], edit: Edit | None, max_new_tokens: int = 32,
                   batch_size: int = 32) -> list[str]:
    """Reference path: :func:`bkdattr.core.generation.generate` with ``edit`` on the full prefill pass at ``p(x)``
    (one edit at a time, nothing shared). Used by tests and the benchmark."""
    def ctx(batch: PromptBatch) -> contextlib.AbstractContextManager:
        if edit is None or edit.is_identity:
            return contextlib.nullcontext()
        return edit.context(lm.arch, batch.last_pos)

    return generate(lm, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size, edit=ctx,
                    progress=False)
