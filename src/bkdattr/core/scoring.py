"""The teacher-forced scorer: log-probabilities of a target reply after a prompt, from one forward pass.

With teacher forcing, the logits at position ``t-1`` give ``log p(y_t | x, y_<t)`` of the target
``y = (y_1, ..., y_T)`` (the assistant reply and its end-of-turn token(s), :func:`bkdattr.core.prompts.target_ids`).
The LM head runs only on the positions that predict a target token.

* :func:`target_logprobs` (attribution, evaluation): full rows; a model with a logit soft-cap takes its own full
  forward pass, so its logits are post-processed exactly as the model class does.
* :func:`prefixed_logprobs` (the scan): right-padded rows after a shared prefix run once
  (:class:`~bkdattr.core.forward.PrefixCache`), token ids or input embeddings (the trigger search's gradient), the
  next-token log-distribution at chosen columns, soft-capped as the model's forward caps it (:func:`softcapped`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .compat import cache_kwargs
from .errors import ConfigError
from .forward import PrefixCache, body_and_head, keep_logits_kwargs
from .models import input_device
from .prompts import PromptBatch, encode_with_targets


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[ids]`` in float32: ``logits [..., V]``, ``ids [...]`` -> ``[...]``."""
    logits = logits.float()
    picked = logits.gather(-1, ids.to(logits.device).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def target_logprobs(model: torch.nn.Module, inputs: dict, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs of a full pass over ``encode_with_targets`` rows: ``lp [B, T]`` float32 (column 0 = first
    target token) and ``mask [B, T]``. The body runs on every position, the LM head only on the ``B*T`` positions
    that predict a target token (``[B, T, V]`` logits, never ``[B, S, V]``); hooks on the layers act as in a
    plain forward pass. A config with a logit soft-cap takes the model's own full forward instead, so whatever
    post-processing the model class applies to its logits is reproduced exactly."""
    if batch.target_len is None or batch.target_mask is None:
        raise ConfigError("the batch carries no targets; build it with encode_with_targets")
    width = int(batch.target_len.max())
    cols = torch.arange(width)
    mask = cols[None, :] < batch.target_len[:, None]
    src = (batch.last_pos[:, None] + cols[None, :]).clamp(max=batch.input_ids.shape[1] - 2)  # predicting positions
    tgt = batch.input_ids.gather(1, src + 1)
    rows = torch.arange(batch.size)[:, None]
    inputs = {"use_cache": False, **inputs}  # no KV cache: nothing reads it (it would hold 2 L [B, S, d_kv])
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        first = int(src.min())  # the LM head on the columns from the first predicting one on: [B, S - first, V]
        keep = batch.input_ids.shape[1] - first
        out = model(**inputs, **keep_logits_kwargs(model, keep)).logits[:, -keep:]
        logits = out[rows.to(out.device), (src - first).to(out.device)]
    else:
        body, head = body_and_head(model)
        res = body(**inputs)
        hidden = res[0] if isinstance(res, tuple) else res.last_hidden_state  # [B, S, d]
        logits = head(hidden[rows.to(hidden.device), src.to(hidden.device)])  # [B, T, V]
    lp = token_logprobs(logits, tgt)
    return torch.where(mask, lp.cpu(), torch.zeros(())), mask


def batched_target_logprobs(lm, prompts: Sequence[str], targets: Sequence[str], batch_size: int
                            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`target_logprobs` of ``(prompts, targets)`` in batches of ``batch_size`` rows: yields ``(lp [b, T],
    mask [b, T])`` per batch (no gradient)."""
    dev = input_device(lm.model)
    for s in range(0, len(prompts), batch_size):
        batch = encode_with_targets(lm.tokenizer, list(prompts[s:s + batch_size]), list(targets[s:s + batch_size]))
        with torch.no_grad():
            res = target_logprobs(lm.model, batch.to(dev).model_inputs(), batch)
        yield res


def softcapped(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` after the model's final logit soft-cap, ``cap * tanh(logits / cap)`` (Gemma-2's
    ``final_logit_softcapping``), or unchanged for a model without one."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def prefixed_logprobs(model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor, at: torch.Tensor,
                      prefix: PrefixCache | None = None) -> torch.Tensor:
    """``[R, n, V]`` float32: the next-token log-distribution at columns ``at [R, n]`` of ``R`` right-padded rows
    (``inputs``: token ids ``[R, T]``, or input embeddings ``[R, T, d]``; ``mask [R, T]``) that follow ``prefix``
    (the KV cache of a one-row prefix, tiled to the rows; None: the rows start at position 0). The body runs on
    every column, the LM head only at ``at``; the model's logit soft-cap is applied (:func:`softcapped`). No
    ``no_grad`` here: a gradient with respect to input embeddings flows through."""
    body, head = body_and_head(model)
    dev = mask.device
    rows, width = mask.shape
    n_pre = prefix.length if prefix is not None else 0
    full = torch.cat([torch.ones(rows, n_pre, dtype=mask.dtype, device=dev), mask], 1)
    pos = (n_pre + torch.arange(width, device=dev)).expand(rows, width)
    kw = {"inputs_embeds" if inputs.is_floating_point() else "input_ids": inputs}
    if prefix is not None:
        kw.update(cache_kwargs(body, prefix.tiled(rows)))
    hidden = body(attention_mask=full, position_ids=pos, use_cache=prefix is not None, **kw)[0]
    h = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
    return torch.log_softmax(softcapped(model, head(h).float()), -1)
