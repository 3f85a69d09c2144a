"""The forward engine shared by every stage: the backbone, a reusable prefix KV cache and batched forward
passes under a capture.

* :func:`backbone` -- the decoder stack without the LM head: every pass that only reads activations (means,
  probe features, prefix caches) runs it, so no ``[B, T, vocab]`` logits are ever built for nothing.
* :class:`PrefixCache` -- tokens before a position cannot see an edit made there (causal attention), so the
  KV cache of a shared prefix is computed once (:meth:`~PrefixCache.build`), copied and tiled for the rows
  that reuse it (:meth:`~PrefixCache.tiled`: ``b*R + r`` replicated rows, or ``g*B + b`` edit-major rows), and
  reset to the prefix after a pass that appended to it (:func:`restored`).
* :class:`CachedRows` -- the one cached step function: prompts prefilled once (:meth:`~CachedRows.prefill`),
  their rows repeated per forced start (:meth:`~CachedRows.repeated`), stepped a few tokens at a time
  (:meth:`~CachedRows.step`: the next-token logits after them) and narrowed to the surviving beams
  (:meth:`~CachedRows.keep`); the scan's target inversion runs on it.
* :func:`captured_pass` -- batch -> forward under a capture -> hand the captured store to the caller, who
  accumulates (mean contributions, residual norms).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch

from .compat import cache_kwargs, output_cache
from .errors import ConfigError
from .models import input_device
from .prompts import PromptBatch, encode_prompts


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (``model.base_model``), or the model itself."""
    bb = getattr(model, "base_model", None)
    return bb if isinstance(bb, torch.nn.Module) and bb is not model else model


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (final norm included) and the LM head of ``model``; a peft wrapper is unwrapped
    (its LoRA layers live inside the base model). Passes that need a few positions' logits run the body and
    project only those rows."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = backbone(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is model or head is None:
        raise ConfigError(f"{type(model).__name__}: cannot find the decoder body and the LM head")
    return body, head


@functools.lru_cache(maxsize=32)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def keep_logits_kwargs(model: torch.nn.Module, n: int) -> dict:
    """``{"logits_to_keep": n}`` where the model's forward takes it (the LM head then runs on the last ``n``
    positions only: ``out.logits`` is ``[B, n, V]``, the same numbers as ``[:, -n:]`` of the full logits), else
    ``{}`` (full logits: slice them with ``[:, -n:]``, which is right either way)."""
    if n < 1:
        raise ValueError(f"logits_to_keep must be >= 1, got {n} (0 means every position in transformers)")
    return {"logits_to_keep": int(n)} if _takes_logits_to_keep(type(model)) else {}


def last_logits_kwargs(model: torch.nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` where the model's forward takes it (the LM head then runs on the last
    position only), else ``{}``."""
    return keep_logits_kwargs(model, 1)


def _cache_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError("the KV cache has no per-layer objects (transformers < 4.56?)")
    return layers


@contextlib.contextmanager
def restored(cache) -> Iterator[None]:
    """Reset the cache's layers to their state at entry when the block exits (a forward pass with the cache
    appends to it; updates concatenate, so the prefix tensors themselves are never written)."""
    snap = [dict(vars(layer)) for layer in _cache_layers(cache)]
    try:
        yield
    finally:
        for layer, state in zip(_cache_layers(cache), snap, strict=True):
            layer.__dict__.clear()
            layer.__dict__.update(state)


#: the shortest common token prefix worth a cached pass of its own
MIN_SHARED_PREFIX = 4


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences, capped so every sequence keeps >= 1 own token."""
    if not seqs:
        return 0
    first, cap = seqs[0], min(len(q) for q in seqs) - 1
    k = 0
    while k < cap and all(q[k] == first[k] for q in seqs):
        k += 1
    return k


class PrefixCache:
    """The KV cache of a prefix of ``length`` columns over ``rows`` rows (see the module docstring)."""

    def __init__(self, cache, rows: int, length: int):
        self.cache, self.rows, self.length = cache, rows, length

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> PrefixCache | None:
        """Run the backbone over the prefix ``input_ids [B, P]`` (on the model's input device); ``None`` when
        ``P == 0`` or the model returns no cache."""
        if input_ids.shape[1] == 0:
            return None

        dev = input_device(model)
        kw = {k: v.to(dev) for k, v in (("attention_mask", attention_mask), ("position_ids", position_ids))
              if v is not None}
        out = backbone(model)(input_ids=input_ids.to(dev), use_cache=True, **kw)
        cache = output_cache(out)
        return None if cache is None else cls(cache, int(input_ids.shape[0]), int(input_ids.shape[1]))

    @classmethod
    def common(cls, model: torch.nn.Module, seqs: Sequence[Sequence[int]]) -> tuple[PrefixCache | None, int]:
        """``(cache, length)`` of the token sequences' common prefix (:func:`common_prefix_length`), run once;
        ``(None, 0)`` when it is shorter than :data:`MIN_SHARED_PREFIX` or the model returns no cache."""
        n = common_prefix_length(seqs)
        pre = cls.build(model, torch.tensor([list(seqs[0][:n])])) if n >= MIN_SHARED_PREFIX else None
        return (pre, n) if pre is not None else (None, 0)

    def tiled(self, reps: int, interleave: bool = True):
        """A copy of the cache with every row repeated ``reps`` times: row ``b*reps + r`` (``interleave``) or
        row ``r*B + b`` (edit-major). The prefix cache itself is left unchanged."""
        c = copy.deepcopy(self.cache)
        if interleave:
            if reps > 1:
                c.batch_repeat_interleave(reps)
        else:
            c.reorder_cache(torch.arange(self.rows).repeat(reps))  # each layer moves the index to its device
        return c

    def kwargs(self, model: torch.nn.Module, cache=None) -> dict:
        """The keyword that passes ``cache`` (default: the prefix cache itself) to ``model``."""
        return cache_kwargs(model, self.cache if cache is None else cache)


class CachedRows:
    """Rows of a KV cache with their attention mask and last position, stepped a few tokens at a time (see the
    module docstring). Row ``b * n + i`` of a :meth:`repeated` copy continues prompt ``i`` for start ``b``."""

    def __init__(self, model: torch.nn.Module, cache, mask: torch.Tensor, last_pos: torch.Tensor):
        self.model, self.cache, self.mask, self.last_pos = model, cache, mask, last_pos

    @classmethod
    @torch.no_grad()
    def prefill(cls, model: torch.nn.Module, batch: PromptBatch) -> tuple[CachedRows, torch.Tensor]:
        """Run the left-padded prompts of ``batch`` (on the model's device) once: ``(rows, logits)``, ``logits``
        ``[n, vocab]`` float32 of the first reply token (the LM head on the last column only)."""
        o = model(**batch.model_inputs(), use_cache=True, **last_logits_kwargs(model))
        return cls(model, output_cache(o), batch.attention_mask, batch.position_ids[:, -1:]), o.logits[:, -1].float()

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def repeated(self, m: int) -> CachedRows:
        """A copy with every row repeated ``m`` times, row ``b * n + i`` (the cache copied, this one unchanged)."""
        n, dev = self.size, self.mask.device
        cache = copy.deepcopy(self.cache)
        cache.reorder_cache(torch.arange(n, device=dev).repeat(m))
        return CachedRows(self.model, cache, self.mask.repeat(m, 1), self.last_pos.repeat(m, 1))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens [rows, k]`` to every row (in place): ``[rows, vocab]`` float32 logits of the token after
        them (the LM head on the last column only)."""
        k = tokens.shape[1]
        mask = torch.cat([self.mask, torch.ones(self.size, k, dtype=self.mask.dtype, device=self.mask.device)], 1)
        pos = self.last_pos + torch.arange(1, k + 1, device=self.mask.device)[None, :]
        o = self.model(input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=True,
                       **cache_kwargs(self.model, self.cache), **last_logits_kwargs(self.model))
        self.cache, self.mask, self.last_pos = output_cache(o), mask, pos[:, -1:]
        return o.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in their order; in place)."""
        self.cache.reorder_cache(rows)
        self.mask, self.last_pos = self.mask[rows], self.last_pos[rows]


@torch.no_grad()
def captured_pass(lm, texts: Sequence[str], capture: Callable[[PromptBatch], contextlib.AbstractContextManager]
                  ) -> tuple[PromptBatch, object]:
    """Render and left-pad ``texts`` (``p(x)`` is the last column), run the backbone once under
    ``capture(batch)``; return ``(batch, store)``, ``store`` being what the capture yielded."""
    batch = encode_prompts(lm.tokenizer, list(texts), padding_side="left").to(input_device(lm.model))
    with capture(batch) as store:
        backbone(lm.model)(**batch.model_inputs(), use_cache=False)
    return batch, store


def past_length(kwargs: dict) -> int:
    """Columns already in the KV cache of a forward call, from its keyword arguments (the cache keyword is
    ``cache`` in newer transformers, ``past_key_values`` before; else ``cache_position``); 0 for a prefill."""
    pkv = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None), None)
    if pkv is not None:
        if hasattr(pkv, "get_seq_length"):
            return int(pkv.get_seq_length())
        with contextlib.suppress(Exception):
            return int(pkv[0][0].shape[-2])
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    return 0
