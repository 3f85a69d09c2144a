"""Architecture adapter: where the heads live in any Hugging Face decoder-only causal LM.

BkdAttr works on the input ``z_l`` of each layer's attention output projection (``o_proj`` in Llama/Qwen2/
Mistral/Gemma, GPT-2's ``c_proj`` Conv1D, NeoX's ``dense``). ``z_l`` is the concatenation of the ``H`` head
outputs, each of size ``d_h``, so head ``h``'s contribution to the attention output is

    a_{l,h} = W_O^l[:, h*d_h:(h+1)*d_h] @ z_{l,h}          (a vector in R^d)

and ``sum_h a_{l,h} + b_O`` is the attention output exactly. :class:`Arch` finds the modules and gives the
effective ``W_O`` as a ``[d_model, H*d_h]`` float32 matrix (Conv1D transposed, LoRA deltas merged), with
``d_h`` read from the weight shape, never ``hidden_size // H``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UnsupportedArchitectureError

_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers",
                "model.language_model.layers", "transformer.blocks")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
_OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj", "wo")
_NORM_NAMES = ("input_layernorm", "ln_1", "ln_attn", "norm_1", "attention_norm", "input_norm", "pre_norm")
_FINAL_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                     "model.decoder.final_layer_norm", "model.language_model.norm", "transformer.norm_f")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_MLP_OUT_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_KV_KEYS = ("num_key_value_heads", "multi_query_group_num", "n_kv_heads")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is GPT-2's ``Conv1D`` (weight stored ``[in, out]``)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _base_weight(m: nn.Module) -> torch.Tensor:
    """Weight of a Linear or Conv1D output projection as ``[out, in]``."""
    if hasattr(m, "base_layer"):  # peft LoRA wrapper
        return _base_weight(m.base_layer)
    w = m.weight
    return w.t() if is_conv1d(m) else w


def _active_lora(m: nn.Module, mtype: str, layer: int) -> list[tuple[str, float]]:
    """``(adapter name, scaling)`` of the unmerged, active LoRA adapters of a peft-wrapped module, as its
    forward applies them (none when adapters are disabled or merged into the base weight)."""
    if not (hasattr(m, "get_delta_weight") and hasattr(m, "lora_A") and hasattr(m, "active_adapters")):
        return []
    if getattr(m, "disable_adapters", False) or getattr(m, "merged", False):
        return []
    out = []
    for name in m.active_adapters:
        if name not in m.lora_A:
            continue
        if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
            raise UnsupportedArchitectureError(f"architecture '{mtype}': layer {layer}'s output projection carries a "
                                               f"LoRA variant (e.g. DoRA) adapter '{name}' whose effective weight is "
                                               "not W + BA; merge it first (merge_and_unload)")
        out.append((name, float(m.scaling[name])))
    return out


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, str(t.device), t.dtype, tuple(t.shape))


@dataclass
class Arch:
    """Where the attention heads of a loaded model live.

    Attributes: ``layers`` (the decoder blocks), ``out_proj[l]`` (the attention output projection of layer
    ``l``), ``input_norm[l]`` (the norm feeding attention), ``n_heads`` (query heads), ``n_kv_heads``,
    ``d_head``, ``d_model``, ``final_norm`` and ``lm_head``.
    """

    model_type: str
    layers: list[nn.Module]
    attn: list[nn.Module]
    out_proj: list[nn.Module]
    input_norm: list[nn.Module]
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    final_norm: nn.Module | None
    lm_head: nn.Module | None
    _w_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def _w_key(self, layer: int) -> tuple:
        """What the effective ``W_O`` of ``layer`` depends on: the weights' storage and version counters (an
        in-place update, a merge or a reload changes them) and the active LoRA adapters."""
        m = self.out_proj[layer]
        base = getattr(m, "base_layer", m)
        parts: list = [_tensor_key(base.weight)]
        for name, scaling in _active_lora(m, self.model_type, layer):
            parts.append((name, scaling, _tensor_key(m.lora_A[name].weight), _tensor_key(m.lora_B[name].weight)))
        return tuple(parts)

    def w_o_heads(self, layer: int) -> torch.Tensor:
        """``W_O`` split per head: float32 ``[H, d_h, d_model]``, so ``a_h = z_h @ W[h]`` (LoRA merged).

        Cached per layer and rebuilt only when the weights change (:meth:`_w_key`); treat it as read-only."""
        key = self._w_key(layer)
        hit = self._w_cache.get(layer)
        if hit is not None and hit[0] == key:
            return hit[1]
        m = self.out_proj[layer]
        w = _base_weight(m).detach().float()
        for name, _scaling in _active_lora(m, self.model_type, layer):
            delta = m.get_delta_weight(name).detach().float()  # B @ A * scaling, [in, out] if fan_in_fan_out
            if getattr(m, "fan_in_fan_out", False):
                delta = delta.t()  # GPT-2 Conv1D layout -> [out, in] (a shape check fails for square W_O)
            w = w + delta.to(w.device)
        heads = w.t().reshape(self.n_heads, self.d_head, self.d_model).contiguous()
        self._w_cache[layer] = (key, heads)
        return heads

    def w_o(self, layer: int) -> torch.Tensor:
        """Effective output-projection weight of ``layer`` as float32 ``[d_model, H*d_h]`` (LoRA merged; a
        read-only view of the cached :meth:`w_o_heads`)."""
        return self.w_o_heads(layer).reshape(self.n_heads * self.d_head, self.d_model).t()

    def b_o(self, layer: int) -> torch.Tensor | None:
        """Output-projection bias of ``layer`` as float32 ``[d_model]`` (LoRA ``lora_bias`` added), or None."""
        m = self.out_proj[layer]
        base = getattr(m, "base_layer", m)
        b = getattr(base, "bias", None)
        b = None if b is None else b.detach().float()
        for name, scaling in _active_lora(m, self.model_type, layer):
            lb = getattr(m.lora_B[name], "bias", None)
            if lb is not None:
                extra = lb.detach().float() * scaling
                b = extra if b is None else b + extra.to(b.device)
        return b

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP output projection of ``layer`` (``down_proj``, GPT-2's ``c_proj`` Conv1D, NeoX's
        ``dense_4h_to_h``): its input is the layer's ``[B, T, d_ff]`` neuron activations; one-line error when the
        layer has none (found on first use, so models without a standard MLP still load)."""
        owner = next((m for n in _MLP_NAMES if isinstance(m := getattr(self.layers[layer], n, None), nn.Module)), None)
        out = next((m for n in _MLP_OUT_NAMES if isinstance(m := getattr(owner, n, None), nn.Module)), None)
        if out is None:
            raise UnsupportedArchitectureError(f"architecture '{self.model_type}': layer {layer} has no MLP output "
                                               f"projection (looked for {', '.join(_MLP_NAMES)} . "
                                               f"{', '.join(_MLP_OUT_NAMES)})")
        return out

    def summary(self) -> dict:
        return {"model_type": self.model_type, "layers": self.n_layers, "heads": self.n_heads,
                "kv_heads": self.n_kv_heads, "d_head": self.d_head, "d_model": self.d_model,
                "output_projection": type(getattr(self.out_proj[0], "base_layer", self.out_proj[0])).__name__}


def _cfg(config, keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        return _cfg(text, keys)
    return None


def detect_arch(model: nn.Module) -> Arch:
    """Build the :class:`Arch` of a causal LM; raise a one-line error naming what could not be found."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", type(model).__name__)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = None
    for p in _LAYER_PATHS:
        cand = _get(root, p)
        if isinstance(cand, nn.ModuleList) and len(cand) > 0:
            layers = list(cand)
            break
    if layers is None:
        raise UnsupportedArchitectureError(f"architecture '{mtype}': no decoder layer list found (looked for "
                                           f"{', '.join(_LAYER_PATHS)}); bkdattr supports Llama, Qwen2, Mistral, "
                                           "Gemma, GPT-2, GPT-NeoX and similar decoder-only models")

    def find(owner: nn.Module, names: tuple[str, ...], missing: str) -> nn.Module:
        m = next((getattr(owner, n) for n in names if isinstance(getattr(owner, n, None), nn.Module)), None)
        if m is None:
            raise UnsupportedArchitectureError(f"architecture '{mtype}': {missing} (looked for {', '.join(names)})")
        return m

    attns, outs, norms = [], [], []
    for i, layer in enumerate(layers):
        attns.append(find(layer, _ATTN_NAMES, f"layer {i} has no attention module"))
        outs.append(find(attns[-1], _OUT_NAMES, f"attention of layer {i} has no output projection"))
        norms.append(find(layer, _NORM_NAMES, f"layer {i} has no attention input norm"))
    n_heads = _cfg(config, _HEAD_KEYS)
    if n_heads is None:
        raise UnsupportedArchitectureError(f"architecture '{mtype}': the config names no head count (looked for "
                                           f"{', '.join(_HEAD_KEYS)})")
    n_kv = _cfg(config, _KV_KEYS) or n_heads
    w = _base_weight(outs[0])
    d_model, inner = int(w.shape[0]), int(w.shape[1])
    if inner % n_heads:
        raise UnsupportedArchitectureError(f"architecture '{mtype}': output projection input size {inner} is not a "
                                           f"multiple of {n_heads} heads")
    d_head = inner // n_heads
    cfg_hd = getattr(config, "head_dim", None)
    if isinstance(cfg_hd, int) and cfg_hd > 0 and cfg_hd != d_head:
        raise UnsupportedArchitectureError(f"architecture '{mtype}': config.head_dim={cfg_hd} disagrees with the "
                                           f"output projection ({d_head})")
    final_norm = next((m for p in _FINAL_NORM_PATHS if (m := _get(root, p)) is not None), None)
    lm_head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    return Arch(mtype, layers, attns, outs, norms, n_heads, n_kv, d_head, d_model, final_norm, lm_head)
