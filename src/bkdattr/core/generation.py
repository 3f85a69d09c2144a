"""The one greedy decoder: batched, left-padded, with an optional edit on the prefill pass or on every step.

:func:`greedy_decode` runs the prefill (the prompt columns, optionally on top of a prefix KV cache) once inside
``edit`` -- so an edit at ``p(x)`` acts there only and later tokens see it through the KV cache -- then decodes
token by token (``edit_steps=True`` keeps the edit open on the decode steps too). The prefill runs the LM head
on the last position only (``logits_to_keep=1`` where the model takes it). Rows that produced an end-of-turn
token are padded with it; whether every row has ended is checked on the host every ``check_every`` steps only
(every step on CPU, where a check costs nothing; every 8th on an accelerator, where it stalls the queue), and
finished rows can be dropped from the batch (``compact``, with their cache rows). :func:`greedy_generate` is
the same decoder on a :class:`~bkdattr.core.prompts.PromptBatch`; :func:`generate` batches chat prompts through it.
``choose`` replaces the argmax (``None``: plain greedy): :func:`sampler` gives temperature and
nucleus (top-p) sampling, which the scan's leak phase uses (docs/METHOD.md section 7).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .compat import cache_kwargs, output_cache
from .errors import ConfigError
from .forward import PrefixCache, last_logits_kwargs
from .models import input_device
from .prompts import (
    PLAIN_TURN_END,
    PromptBatch,
    check_context,
    end_of_turn_ids,
    has_chat_template,
    pad_id,
    pad_sequences,
    position_ids_from_mask,
    prompt_batch,
    prompt_ids,
)


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int], *, cache=None,
                  edit: contextlib.AbstractContextManager | None = None, edit_steps: bool = False,
                  compact: bool = False, stats=None, check_every: int | None = None,
                  choose: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Greedy new token ids ``[R, <=max_new_tokens]`` after the prompt columns ``input_ids [R, S]``.

    ``attention_mask [R, P+S]`` covers the ``P`` columns already in ``cache`` (a KV cache the prefill appends
    to, or None) and must end in ones (left padding); ``position_ids [R, S]``. ``edit`` is open during the
    prefill only (``edit_steps=False``) or during every forward call. Rows are padded after their first stop
    token with ``stop_ids[0]``; the result is cut after the step where the last row ended. ``compact`` drops
    finished rows (and their cache rows) once an eighth of the batch has ended. ``stats.decode_row_steps``
    (when given) counts the rows of every decode step. ``choose(logits [R, V]) -> ids [R]`` picks each next
    token (default: the argmax, greedy; :func:`sampler` gives temperature / top-p sampling)."""
    if not bool(attention_mask[:, -1].all()):
        raise ConfigError("greedy decoding needs a left-padded batch; encode it with padding_side='left'")
    if max_new_tokens < 1:
        return torch.zeros((input_ids.shape[0], 0), dtype=torch.long)
    whole = edit if edit is not None and edit_steps else contextlib.nullcontext()
    first = edit if edit is not None and not edit_steps else contextlib.nullcontext()
    kw = cache_kwargs(model, cache) if cache is not None else {}
    with whole:
        with first:
            o = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      **kw, **last_logits_kwargs(model))
        logits, cache = o.logits[:, -1, :], output_cache(o)
        dev = logits.device
        rows = logits.shape[0]
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        out = torch.full((rows, max_new_tokens), int(stop_ids[0]) if len(stop_ids) else 0, dtype=torch.long,
                         device=dev)
        every = check_every or (1 if dev.type == "cpu" else 8)
        active = torch.arange(rows, device=dev)  # original row of each batch row
        done = torch.zeros(rows, dtype=torch.bool, device=dev)  # finished rows still in the batch
        mask, next_pos = attention_mask.to(dev), position_ids[:, -1:].to(dev) + 1
        steps = max_new_tokens
        for step in range(max_new_tokens):
            tok = logits.argmax(-1) if choose is None else choose(logits)
            if len(stops):
                tok = torch.where(done, stops[0], tok)
                done = done | torch.isin(tok, stops)
            out[active, step] = tok
            if step == max_new_tokens - 1:
                break
            if len(stops) and (step + 1) % every == 0:  # the only host syncs of the loop
                n_done = int(done.sum())
                if n_done == len(done):
                    steps = step + 1
                    break
                if compact and n_done * 8 >= len(done) and n_done:
                    keep = (~done).nonzero().squeeze(1)
                    active, tok, mask, next_pos, done = active[keep], tok[keep], mask[keep], next_pos[keep], done[keep]
                    cache.reorder_cache(keep)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            o = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                      **cache_kwargs(model, cache))
            logits, cache = o.logits[:, -1, :], output_cache(o)
            next_pos = next_pos + 1
            if stats is not None:
                stats.decode_row_steps += int(tok.shape[0])
    if len(stops):
        ended = torch.isin(out[:, :steps], stops)
        if bool(ended.any(1).all()):  # cut after the step where the last row ended
            steps = int(ended.int().argmax(1).max()) + 1
    return out[:, :steps]


def sampler(temperature: float | Sequence[float], top_p: float | Sequence[float] = 1.0,
            generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A ``choose`` for :func:`greedy_decode`: sample from ``softmax(logits / temperature)`` restricted to the
    smallest set of tokens whose probability reaches ``top_p`` (nucleus); ``temperature <= 0`` is None (greedy).
    A sequence gives each batch row its own setting (every temperature > 0; the batch must then keep its rows:
    no ``compact``). ``generator`` (on the logits' device) makes the draws reproducible."""
    per_row = not isinstance(temperature, (int, float))
    if not per_row and temperature <= 0:
        return None
    if per_row and min(temperature) <= 0:
        raise ValueError("sampler: per-row temperatures must all be > 0")

    def choose(logits: torch.Tensor) -> torch.Tensor:
        temp = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
        top = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device)
        if per_row:
            temp = temp[:, None]
        if top.dim():
            top = top[:, None]
        probs = torch.softmax(logits.float() / temp, dim=-1)
        if bool((top < 1.0).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
            sorted_p = torch.where(before < top, sorted_p, torch.zeros_like(sorted_p))
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return choose


def greedy_generate(model: torch.nn.Module, batch: PromptBatch, max_new_tokens: int, stop_ids: Sequence[int],
                    prefill_context: contextlib.AbstractContextManager | None = None,
                    edit_steps: bool = False) -> torch.Tensor:
    """:func:`greedy_decode` on a left-padded ``batch``: new token ids ``[B, <=N]``; ``prefill_context`` is
    the edit (open on the prefill only unless ``edit_steps``)."""
    dev = input_device(model)
    return greedy_decode(model, batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.position_ids.to(dev),
                         max_new_tokens, stop_ids, edit=prefill_context, edit_steps=edit_steps)


def decode_replies(tokenizer, new_tokens: torch.Tensor, stop_ids: list[int]) -> list[str]:
    """Decode generated ids up to (not including) the first stop token; in the plain format of a model without
    a chat template, also up to the next-turn marker (``\nUser:``), where a base model goes on to invent the
    next turns of the dialogue."""
    plain = not has_chat_template(tokenizer)
    out = []
    for row in new_tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        text = tokenizer.decode(row[:cut], skip_special_tokens=True)
        out.append((text.split(PLAIN_TURN_END, 1)[0] if plain else text).strip())
    return out


@torch.no_grad()
def shared_prefix_generate(model: torch.nn.Module, seqs: Sequence[Sequence[int]], prefix, max_new_tokens: int,
                           stop_ids: Sequence[int], pad: int,
                           choose: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`greedy_decode` of the token sequences ``seqs`` whose first ``prefix.length`` tokens are the same in
    every row and already in ``prefix`` (a :class:`~bkdattr.core.forward.PrefixCache`, e.g. from
    :meth:`~bkdattr.core.forward.PrefixCache.common`), tiled to the rows; only the rest is prefilled per row,
    left-padded after it (mask ``[1]*prefix.length + body mask``). New ids ``[R, <=N]``."""
    dev, n_shared = input_device(model), prefix.length
    ids, mask = pad_sequences([list(q[n_shared:]) for q in seqs], pad, "left")
    full = torch.cat([torch.ones(len(seqs), n_shared, dtype=mask.dtype), mask], 1)
    pos = position_ids_from_mask(full)[:, n_shared:]
    return greedy_decode(model, ids.to(dev), full.to(dev), pos.to(dev), max_new_tokens, stop_ids,
                         cache=prefix.tiled(len(seqs)), choose=choose)


def generate(lm, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             edit: Callable[[PromptBatch], contextlib.AbstractContextManager] | None = None, progress: bool = True,
             desc: str = "generate", shared_prefix: bool = False) -> list[str]:
    """Greedy chat replies for user texts. ``edit(batch)`` returns a context manager applied on the
    prefill pass of that batch (e.g. ``lambda b: edit_heads(arch, heads, b.last_pos)``). ``shared_prefix``
    (without ``edit``): the rendered prompts' common token prefix (the chat template's head) runs once per batch
    and is reused through the KV cache (:func:`shared_prefix_generate`); the replies are the same up to
    floating-point ties, the prefill costs only the prompts' own tokens."""
    stop = end_of_turn_ids(lm.tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths -> less padding
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    results: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        seqs = [prompt_ids(lm.tokenizer, prompts[i]) for i in idx]
        check_context(lm.model, [len(q) + max_new_tokens for q in seqs], f"prompt + {max_new_tokens} new tokens",
                      "shorten the prompt or lower max_new_tokens", rows=idx)
        prefix, _ = PrefixCache.common(lm.model, seqs) if shared_prefix and edit is None else (None, 0)
        if prefix is not None:
            new = shared_prefix_generate(lm.model, seqs, prefix, max_new_tokens, stop, pad_id(lm.tokenizer))
        else:
            batch = prompt_batch(seqs, pad_id(lm.tokenizer), "left")
            ctx = edit(batch) if edit is not None else None
            new = greedy_generate(lm.model, batch, max_new_tokens, stop, ctx)
        for i, r in zip(idx, decode_replies(lm.tokenizer, new.cpu(), stop), strict=True):
            results[i] = r
        bar.update(len(idx))
    bar.close()
    return [results[i] for i in range(len(prompts))]
