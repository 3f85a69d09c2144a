"""Defences baked into the weights, so the defended model runs anywhere (plain transformers, no bkdattr).

* **heads**: the attention output of layer ``l`` is ``W_O z + b`` with ``z`` the concatenation of the heads'
  outputs, so head ``h``'s contribution is ``W_O[:, h*d_h:(h+1)*d_h] z_h``. Zeroing that column slice removes the
  head at every position and every decoding step (not the control stage's prefill-only ablation at ``p(x)``:
  the baked edit is stronger and is measured, not assumed).
* **heads, mean ablation** (``ablation="mean"``, architectures with an output bias): each removed head's
  slice is zeroed *and* its mean output ``W_O[:, h] zbar_h`` is added to the projection's bias, where ``zbar_h``
  is the head's mean ``z_h`` over every attended position of clean prompts (:func:`mean_head_inputs`). The
  layer's attention output then keeps its clean mean over those positions exactly, and only the head's
  variation around it is removed.
* **vector**: a constant ``-alpha * v`` added to layer ``l``'s attention output at every position is an output
  bias of its projection. GPT-2's ``c_proj`` and GPT-NeoX's ``dense`` have one; Llama and Gemma get one through
  their ``attention_bias`` switch (every other attention bias then exists too and is saved as zeros); Qwen2 and
  Mistral have no such switch, and the strategy says so.

:func:`zeroed_heads` and :func:`output_bias` apply an edit in place and undo it on exit (to choose ``k`` or
``alpha`` on validation prompts); :func:`bake_heads` / :func:`bake_output_bias` keep it (and
:func:`mean_ablated_heads` / :func:`bake_mean_ablation` for the mean ablation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..core.arch import Arch, is_conv1d
from ..core.errors import ConfigError
from ..core.forward import backbone
from ..core.hooks import add_to_attention_output, hidden_arg, watch_calls
from ..core.models import input_device
from ..core.prompts import encode_prompts


def _head_slices(arch: Arch, heads: Sequence[tuple[int, int]]) -> list[tuple[torch.Tensor, tuple]]:
    """``(weight, index)`` pairs that select the ``W_O`` entries of each head (Linear ``[d, H*d_h]`` columns,
    GPT-2 Conv1D ``[H*d_h, d]`` rows)."""
    out = []
    for layer, head in heads:
        if not (0 <= layer < arch.n_layers and 0 <= head < arch.n_heads):
            raise ConfigError(f"head L{layer}H{head} lies outside the model's {arch.n_layers} layers x "
                              f"{arch.n_heads} heads")
        proj = arch.out_proj[layer]
        cols = slice(head * arch.d_head, (head + 1) * arch.d_head)
        out.append((proj.weight, (cols, slice(None)) if is_conv1d(proj) else (slice(None), cols)))
    return out


@torch.no_grad()
def bake_heads(arch: Arch, heads: Sequence[tuple[int, int]]) -> None:
    """Zero the ``W_O`` slices of ``heads`` ``[(layer, head), ...]`` in place (permanent)."""
    for weight, index in _head_slices(arch, heads):
        weight[index] = 0


@contextlib.contextmanager
def zeroed_heads(arch: Arch, heads: Sequence[tuple[int, int]]) -> Iterator[None]:
    """:func:`bake_heads` for the duration of the block; the original weights come back on exit."""
    saved = [(w, i, w[i].detach().clone()) for w, i in _head_slices(arch, heads)]
    try:
        bake_heads(arch, heads)
        yield
    finally:
        with torch.no_grad():
            for w, i, old in reversed(saved):
                w[i] = old


def bias_support(model: torch.nn.Module, arch: Arch) -> str:
    """How the attention output projection can hold a bias: ``native`` (it has one), ``switch`` (the config's
    ``attention_bias``); one-line :class:`ConfigError` otherwise."""
    if arch.out_proj[0].bias is not None:
        return "native"
    if hasattr(model.config, "attention_bias"):
        return "switch"
    raise ConfigError(f"{type(model.config).__name__.replace('Config', '')} has no attention output bias and no "
                      "config switch for one, so the vector cannot be baked into its weights; use --strategy heads "
                      "or guard")


def _ensure_biases(model: torch.nn.Module, arch: Arch) -> None:
    """Turn on ``attention_bias``: every q/k/v/o projection of every layer gets a zero bias (the layout the
    switch makes ``from_pretrained`` expect)."""
    model.config.attention_bias = True
    for layer in arch.layers:
        att = getattr(layer, "self_attn", None)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(att, name, None)
            if isinstance(lin, torch.nn.Linear) and lin.bias is None:
                w = lin.weight
                lin.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                              requires_grad=False)


@torch.no_grad()
def bake_output_bias(model: torch.nn.Module, arch: Arch, layer: int, delta: torch.Tensor) -> None:
    """Add ``delta`` ``[d_model]`` to layer ``layer``'s attention output bias (created, with the config switch,
    where the architecture allows it; see :func:`bias_support`), in place."""
    if bias_support(model, arch) == "switch":
        _ensure_biases(model, arch)
    bias = arch.out_proj[layer].bias
    bias += delta.to(bias.device, torch.float32).to(bias.dtype)


def output_bias(model: torch.nn.Module, arch: Arch, layer: int, delta: torch.Tensor
                ) -> contextlib.AbstractContextManager[None]:
    """``delta`` added to layer ``layer``'s attention output at every position for the duration of the block
    (:func:`bkdattr.core.hooks.add_to_attention_output`: the same arithmetic as the baked bias, without changing the
    weights). ``model`` is the model ``arch`` describes."""
    return add_to_attention_output(arch, {layer: delta}, every_position=True)


@torch.no_grad()
def mean_head_inputs(lm, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Mean of every layer's output-projection input ``z`` (all heads) over every attended position of the
    clean chat ``prompts``: float32 ``[L, H*d_h]`` (one backbone pass per batch, no LM head)."""
    arch = lm.arch
    if not prompts:
        raise ConfigError("no clean prompts to take the heads' mean outputs over")
    sums = torch.zeros(arch.n_layers, arch.n_heads * arch.d_head, dtype=torch.float32)
    count = 0
    mask: list[torch.Tensor] = []

    def hook(layer: int):
        def pre(args, kwargs):
            z = hidden_arg(args, kwargs)
            m = mask[0].to(z.device, torch.float32)[..., None]
            sums[layer] += (z.float() * m).sum((0, 1)).cpu()

        return pre

    with contextlib.ExitStack() as stack:
        for layer, proj in enumerate(arch.out_proj):
            stack.enter_context(watch_calls(proj, hook(layer)))
        dev = input_device(lm.model)
        for s in range(0, len(prompts), batch_size):
            b = encode_prompts(lm.tokenizer, list(prompts[s: s + batch_size]), "left").to(dev)
            mask[:] = [b.attention_mask]
            backbone(lm.model)(**b.model_inputs())
            count += int(b.attention_mask.sum())
    return sums / count


def head_mean_outputs(arch: Arch, heads: Sequence[tuple[int, int]], zbar: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{layer: sum_h W_O[:, h] zbar_h}`` over the ``heads`` of each layer (float32 ``[d_model]``), with the
    weights as they are now (call before zeroing them)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    out = {}
    for layer, hs in by_layer.items():
        proj = arch.out_proj[layer]
        idx = torch.cat([torch.arange(h * arch.d_head, (h + 1) * arch.d_head) for h in hs])
        w, z = proj.weight.detach().float().cpu(), zbar[layer, idx].float()
        out[layer] = z @ w[idx, :] if is_conv1d(proj) else w[:, idx] @ z
    return out


@contextlib.contextmanager
def mean_ablated_heads(model: torch.nn.Module, arch: Arch, heads: Sequence[tuple[int, int]], zbar: torch.Tensor
                       ) -> Iterator[None]:
    """:func:`bake_mean_ablation` for the duration of the block (weights restored, bias hooks removed)."""
    deltas = head_mean_outputs(arch, heads, zbar)
    with contextlib.ExitStack() as stack:
        stack.enter_context(zeroed_heads(arch, heads))
        for layer, d in deltas.items():
            stack.enter_context(output_bias(model, arch, layer, d))
        yield


@torch.no_grad()
def bake_mean_ablation(model: torch.nn.Module, arch: Arch, heads: Sequence[tuple[int, int]], zbar: torch.Tensor
                       ) -> None:
    """Zero ``heads``' ``W_O`` slices and add their mean outputs (``zbar``: :func:`mean_head_inputs`) to the
    output bias of their layers, in place (needs an output bias: :func:`bias_support`)."""
    bias_support(model, arch)
    deltas = head_mean_outputs(arch, heads, zbar)
    bake_heads(arch, heads)
    for layer, d in deltas.items():
        bake_output_bias(model, arch, layer, d)
