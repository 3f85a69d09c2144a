"""Shared-prefix greedy generation for many edits of the same prompts.

Every control edit (head ablation, Backdoor Vector) acts at the last prompt position ``p(x)`` only, so the
tokens before it are computed identically under every edit. :func:`sweep_generate` therefore

1. renders and left-pads a batch of prompts; under left padding ``p(x)`` is the last column of every row;
2. runs the **unedited prefix** (all columns but the last) once and keeps its KV cache;
3. for a group of edits, tiles that cache once per edit (edit-major rows), runs the single token at ``p(x)``
   with each row's edit active (:func:`bkdattr.control.edits.rowwise_context`), then decodes greedily without
   any edit (later tokens see the edit through the KV cache, as in
   :func:`bkdattr.generation.greedy_generate` with a ``prefill_context``);
4. drops finished rows from the batch as they end (their cache rows too) and stops when every row ended.

Many edits share one decode batch, which on a CPU keeps the matrix products large. The result equals
generating each edit on its own with the edit on the full prefill pass (tested token for token on tiny
models; floating-point sums may round differently, so on near-ties a token can differ in principle).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..compat import cache_kwargs, output_cache
from ..errors import ConfigError
from ..generation import decode_replies, generate
from ..prompts import PromptBatch, encode_prompts, end_of_turn_ids
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


@functools.lru_cache(maxsize=32)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _input_device(model: torch.nn.Module) -> torch.device:
    from ..models import input_device

    return input_device(model)


def _as_cache(cache):
    """A ``Cache`` object (older transformers return legacy tuples when no cache was passed in)."""
    if isinstance(cache, (tuple, list)):
        from transformers import DynamicCache

        return DynamicCache.from_legacy_cache(tuple(cache))
    return cache


@torch.no_grad()
def prefix_cache(model: torch.nn.Module, batch: PromptBatch):
    """KV cache of every column but the last of a left-padded ``batch`` (None when prompts are 1 token)."""
    if batch.input_ids.shape[1] < 2:
        return None
    dev = _input_device(model)
    kw = {"logits_to_keep": 1} if _takes_logits_to_keep(type(model)) else {}
    out = model(input_ids=batch.input_ids[:, :-1].to(dev), attention_mask=batch.attention_mask[:, :-1].to(dev),
                position_ids=batch.position_ids[:, :-1].to(dev), use_cache=True, **kw)
    return _as_cache(output_cache(out))


@torch.no_grad()
def decode_greedy(model: torch.nn.Module, cache, logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor,
                  stop_ids: Sequence[int], max_new_tokens: int, stats: SweepStats | None = None) -> torch.Tensor:
    """Greedy decode from the logits at ``p(x)`` (``[R, V]``) and the cache holding ``p(x)``.

    ``mask``: ``[R, T]`` attention mask so far; ``next_pos``: ``[R, 1]`` position of the next token. Finished
    rows leave the batch (their cache rows are dropped). Returns ids ``[R, max_new_tokens]``, padded after the
    first stop token with ``stop_ids[0]``."""
    dev = logits.device
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    n_rows = logits.shape[0]
    pad = int(stops[0]) if len(stops) else 0
    out = torch.full((n_rows, max_new_tokens), pad, dtype=torch.long, device=dev)
    active = torch.arange(n_rows, device=dev)  # original row of each batch row
    done = torch.zeros(n_rows, dtype=torch.bool, device=dev)  # finished rows still in the batch
    for step in range(max_new_tokens):
        tok = logits.argmax(-1)
        live = ~done
        out[active[live], step] = tok[live]
        done = done | torch.isin(tok, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        n_done = int(done.sum())
        if n_done and n_done * 8 >= len(done):  # compact: drop finished rows (and their cache rows)
            keep = (~done).nonzero().squeeze(1)
            active, tok, mask, next_pos, done = active[keep], tok[keep], mask[keep], next_pos[keep], done[keep]
            cache.reorder_cache(keep)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        o = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                  **cache_kwargs(model, cache))
        cache = _as_cache(output_cache(o))
        logits = o.logits[:, -1, :]
        next_pos = next_pos + 1
        if stats is not None:
            stats.decode_row_steps += int(tok.shape[0])
    return out


@torch.no_grad()
def generate_group(lm, batch: PromptBatch, cache, edits: Sequence[Edit], max_new_tokens: int,
                   stop_ids: Sequence[int], stats: SweepStats | None = None) -> torch.Tensor:
    """New token ids ``[len(edits) * B, max_new_tokens]`` (edit-major) for one prompt batch whose prefix
    ``cache`` (from :func:`prefix_cache`) is shared; the cache itself is left unchanged."""
    model, arch = lm.model, lm.arch
    dev = _input_device(model)
    n, b = len(edits), batch.size
    if cache is None:  # one-token prompts: the whole prompt is p(x)
        c, ids, mask, pos = None, batch.input_ids, batch.attention_mask, batch.position_ids
    else:
        c = copy.deepcopy(cache)
        c.reorder_cache(torch.arange(b, device=dev).repeat(n))
        ids, mask, pos = batch.input_ids[:, -1:], batch.attention_mask, batch.position_ids[:, -1:]
    ids, mask, pos = ids.repeat(n, 1).to(dev), mask.repeat(n, 1).to(dev), pos.repeat(n, 1).to(dev)
    where = torch.full((n * b,), ids.shape[1] - 1, dtype=torch.long)
    kw = cache_kwargs(model, c) if c is not None else {}
    with rowwise_context(arch, edits, b, where):
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
    if stats is not None:
        stats.rows += n * b
    return decode_greedy(model, _as_cache(output_cache(o)), o.logits[:, -1, :], mask, pos[:, -1:] + 1, stop_ids,
                         max_new_tokens, stats)


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
    """Reference path: :func:`bkdattr.generation.generate` with ``edit`` on the full prefill pass at ``p(x)``
    (one edit at a time, nothing shared). Used by tests and the benchmark."""
    def ctx(batch: PromptBatch) -> contextlib.AbstractContextManager:
        if edit is None or edit.is_identity:
            return contextlib.nullcontext()
        return edit.context(lm.arch, batch.last_pos)

    return generate(lm, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size, edit=ctx,
                    progress=False)
