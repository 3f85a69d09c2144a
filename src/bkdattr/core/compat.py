"""Small shims over transformers versions (the KV-cache argument was renamed ``past_key_values`` -> ``cache``)."""

from __future__ import annotations

import functools
import inspect

import torch


@functools.lru_cache(maxsize=64)
def _cache_name(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever the model's forward takes."""
    return {_cache_name(type(model)): cache}


def output_cache(out):
    """The KV cache of a model output, whatever the attribute is called (legacy tuples become a
    ``DynamicCache``)."""
    c = getattr(out, "cache", None)
    c = c if c is not None else getattr(out, "past_key_values", None)
    if isinstance(c, (tuple, list)):
        # lazy: transformers takes about a second to import; a model's output means it is loaded already
        from transformers import DynamicCache

        c = DynamicCache.from_legacy_cache(tuple(c))
    return c
