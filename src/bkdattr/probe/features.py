"""Probe features: what every layer holds at the last prompt position ``p(x)``, captured in batched passes.

The Backdoor Probe (docs/METHOD.md section 2) reads one vector per layer and prompt:

* ``kind="attn_input"`` (default): ``r_l(x)``, the *normalised* input of layer ``l``'s attention, i.e. the output
  of the layer's input norm at ``p(x)``;
* ``kind="residual"``: the raw residual stream entering layer ``l`` at ``p(x)``.

:func:`extract_features` renders each prompt with the chat template, left-pads batches of similar length (so
``p(x)`` is the last column) and runs the model's *backbone* only (the LM head is not needed), with
:func:`bkdattr.core.hooks.capture_features` collecting all layers in the same pass. The result is a float32 tensor
``[N, L, d_model]`` in the order of the input texts.

**Shared prefix.** Chat-templated prompts all begin with the same tokens (SmolLM2's template adds a 26-token
system turn before an ~10-token user text). In a causal model those positions do not depend on what follows,
so their keys/values are computed once (batch 1) and every batch runs only its own suffix on a copy of that
KV cache; the features equal the full-prompt ones to float rounding (tested on every tiny architecture), at
about a third of the cost on the embedded model. The prefix is the longest common *token* prefix of all
rendered prompts (never the whole of any prompt); ``share_prefix=False`` switches this off.

:func:`cached_features` keys the result by a hash of (model fingerprint, tokenizer rendering, texts, kind,
layers) and stores it as safetensors, so a second call with the same inputs reads the file and never runs the
model. The model fingerprint hashes every parameter's name, shape, dtype and a strided sample of its values:
a re-injected backdoor (new LoRA weights merged into every projection) changes it, a reload does not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.errors import ConfigError, DataError
from ..core.forward import PrefixCache, backbone
from ..core.hooks import capture_features, check_layers
from ..core.io import check_metadata, load_tensors, save_tensors, stable_hash
from ..core.models import LoadedModel, input_device
from ..core.prompts import pad_id, pad_sequences, position_ids_from_mask, prompt_ids, render_prompt

FEATURE_KINDS = ("attn_input", "residual")
_SAMPLE = 2048


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is a known feature kind, else raise :class:`ConfigError`."""
    if kind not in FEATURE_KINDS:
        raise ConfigError(f"unknown feature kind '{kind}'; use one of {', '.join(FEATURE_KINDS)}")
    return kind


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short hex digest of a model's weights: each parameter's name, shape, dtype and ``<= 2048`` values taken
    at an even stride (cheap: no full pass over the weights)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", torch.float32).numpy()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(lm: LoadedModel, texts: Sequence[str], kind: str = "attn_input", batch_size: int = 16,
                     layers: Sequence[int] | None = None, progress: bool = False, desc: str = "features",
                     share_prefix: bool = True) -> torch.Tensor:
    """Features of every (or each listed) layer at ``p(x)`` for user ``texts``.

    Returns float32 ``[N, L_sel, d_model]`` (rows in the order of ``texts``; ``L_sel`` = ``len(layers)`` or all
    layers). One forward pass of the backbone per batch captures every layer at once; with ``share_prefix`` the
    prompts' common token prefix is run once and reused through the KV cache (see the module docstring)."""
    check_kind(kind)
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} must be >= 1")
    texts = list(texts)
    layer_list = check_layers(lm.arch, layers)
    out = torch.empty(len(texts), len(layer_list), lm.arch.d_model, dtype=torch.float32)
    if not texts:
        return out
    seqs = [prompt_ids(lm.tokenizer, t) for t in texts]
    net = backbone(lm.model)
    dev = input_device(lm.model)
    prefix, n_pre = PrefixCache.common(lm.model, seqs) if share_prefix and len(texts) > 1 else (None, 0)
    order = sorted(range(len(texts)), key=lambda i: len(seqs[i]))  # similar lengths -> little padding
    pid = pad_id(lm.tokenizer)
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        ids, mask = pad_sequences([seqs[i][n_pre:] for i in idx], pid, "left")  # p(x): every row's last column
        width = ids.shape[1]
        pos = position_ids_from_mask(mask) + n_pre
        extra: dict = {}
        if prefix is not None:
            mask = torch.cat([torch.ones(len(idx), n_pre, dtype=torch.long), mask], dim=1)
            extra = prefix.kwargs(net, prefix.tiled(len(idx)))
        last = torch.full((len(idx),), width - 1, dtype=torch.long, device=dev)
        with capture_features(lm.arch, last, kind=kind, layers=layer_list) as store:
            net(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                use_cache=prefix is not None, **extra)
        # under device_map="auto" each layer's rows sit on its own GPU: gather them on the CPU before stacking
        feats = torch.stack([store[x].to("cpu", torch.float32) for x in layer_list], dim=1)  # [B, L_sel, d]
        out[torch.tensor(idx)] = feats
        bar.update(len(idx))
    bar.close()
    return out


def feature_cache_key(lm: LoadedModel, texts: Sequence[str], kind: str, layers: Sequence[int] | None = None) -> str:
    """Hash of everything the features depend on: model weights, prompt rendering, texts, kind, layers."""
    layer_list = list(range(lm.arch.n_layers)) if layers is None else [int(x) for x in layers]
    return stable_hash({
        "model": model_fingerprint(lm.model),
        "dtype": str(lm.dtype),
        "render": render_prompt(lm.tokenizer, "{x}"),
        "vocab": len(lm.tokenizer),
        "texts": hashlib.sha256("\u241e".join(texts).encode()).hexdigest(),
        "n": len(texts),
        "kind": kind,
        "layers": layer_list,
    })


def cached_features(lm: LoadedModel, texts: Sequence[str], cache_dir: str | Path, kind: str = "attn_input",
                    batch_size: int = 16, layers: Sequence[int] | None = None, tag: str = "features",
                    progress: bool = False) -> tuple[torch.Tensor, Path, bool]:
    """:func:`extract_features` with a safetensors cache under ``cache_dir``.

    Returns ``(features [N, L_sel, d_model], path, from_cache)``; with a cache hit the model is not run."""
    check_kind(kind)
    texts = list(texts)
    if not texts:
        raise DataError("no prompts to extract features from; check the run's data splits")
    key = feature_cache_key(lm, texts, kind, layers)
    path = Path(cache_dir) / f"{tag}-{kind}-{key}.safetensors"
    n_layers = lm.arch.n_layers if layers is None else len(list(layers))
    shape = (len(texts), n_layers, lm.arch.d_model)
    if path.is_file():
        check_metadata(path, {"key": key, "kind": kind})  # a foreign file copied under this name is refused
        return load_tensors(path, expect={"features": shape})["features"], path, True
    feats = extract_features(lm, texts, kind=kind, batch_size=batch_size, layers=layers, progress=progress, desc=tag)
    save_tensors(path, {"features": feats}, metadata={"kind": kind, "key": key, "model": lm.name, "n": str(len(texts))})
    return feats, path, False
