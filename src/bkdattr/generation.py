"""Batched greedy generation with left padding and an optional edit on the prefill pass only.

:func:`greedy_generate` runs the prefill (the whole prompt) once inside ``prefill_context`` -- so an edit at
``p(x)`` acts there only and later tokens see it through the KV cache -- then decodes token by token, stopping
as soon as every row has produced an end-of-turn token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .compat import cache_kwargs, output_cache
from .prompts import PromptBatch, check_context, encode_prompts, end_of_turn_ids


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    batch: PromptBatch,
    max_new_tokens: int,
    stop_ids: list[int],
    prefill_context: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """Greedy decode ``max_new_tokens`` for a left-padded batch. Returns new token ids ``[B, <=N]``
    (rows that ended are padded with their first stop token). ``prefill_context`` is open during the
    prefill forward only; decode steps run without it (they see its effect through the KV cache)."""
    from .errors import ConfigError
    from .models import input_device

    if not bool(batch.attention_mask[:, -1].all()):
        raise ConfigError("greedy_generate needs a left-padded batch; encode it with padding_side='left'")
    if max_new_tokens < 1:
        return torch.zeros((batch.size, 0), dtype=torch.long)
    dev = input_device(model)
    ids, mask, pos = batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.position_ids.to(dev)
    with prefill_context or contextlib.nullcontext():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past = output_cache(out)
    logits = out.logits[:, -1, :]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
    new_tokens = []
    next_pos = pos[:, -1:] + 1
    for step in range(max_new_tokens):
        tok = logits.argmax(-1)
        if len(stops):
            tok = torch.where(done, stops[0], tok)
        new_tokens.append(tok)
        done = done | torch.isin(tok, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **cache_kwargs(model, past))
        past = output_cache(out)
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return torch.stack(new_tokens, dim=1)


def decode_replies(tokenizer, new_tokens: torch.Tensor, stop_ids: list[int]) -> list[str]:
    """Decode generated ids up to (not including) the first stop token."""
    out = []
    for row in new_tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return out


def generate(
    lm,
    prompts: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    edit: Callable[[PromptBatch], contextlib.AbstractContextManager] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy chat replies for user texts. ``edit(batch)`` returns a context manager applied on the
    prefill pass of that batch (e.g. ``lambda b: edit_heads(arch, heads, b.last_pos)``)."""
    stop = end_of_turn_ids(lm.tokenizer)
    replies: list[str] = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths -> less padding
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    results: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = encode_prompts(lm.tokenizer, [prompts[i] for i in idx], padding_side="left")
        check_context(lm.model, [int(n) + max_new_tokens for n in batch.attention_mask.sum(1)],
                      f"prompt + {max_new_tokens} new tokens", "shorten the prompt or lower max_new_tokens", rows=idx)
        ctx = edit(batch) if edit is not None else None
        new = greedy_generate(lm.model, batch, max_new_tokens, stop, ctx)
        for i, r in zip(idx, decode_replies(lm.tokenizer, new.cpu(), stop), strict=True):
            results[i] = r
        bar.update(len(idx))
    bar.close()
    replies = [results[i] for i in range(len(prompts))]
    return replies
