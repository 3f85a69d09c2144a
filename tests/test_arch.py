"""The architecture adapter on tiny random models of six architectures, and its errors on anything else."""

from __future__ import annotations

import functools
import types

import pytest
import torch
from torch import nn

from bkdattr.core.arch import detect_arch
from bkdattr.core.errors import UnsupportedArchitectureError
from tiny import ARCHS, make_tiny

# (kv heads, d_head, output projection type) of the tiny configs in tests/tiny.py (4 query heads, d_model 64)
EXPECTED = {
    "llama": (2, 16, "Linear"),
    "qwen2": (2, 16, "Linear"),
    "mistral": (1, 16, "Linear"),
    "gemma": (1, 32, "Linear"),
    "gpt2": (4, 16, "Conv1D"),
    "gpt_neox": (4, 16, "Linear"),
}
OUT_NAMES = {"llama": "o_proj", "qwen2": "o_proj", "mistral": "o_proj", "gemma": "o_proj", "gpt2": "c_proj",
             "gpt_neox": "dense"}
FINAL_NORMS = {"llama": "model.norm", "qwen2": "model.norm", "mistral": "model.norm", "gemma": "model.norm",
               "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


@functools.cache
def tiny(arch: str):
    return make_tiny(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_summary_and_modules(arch):
    lm = tiny(arch)
    a = lm.arch
    kv, d_head, proj = EXPECTED[arch]
    assert a.model_type == arch
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.d_head, a.d_model) == (2, 4, kv, d_head, 64)
    assert a.n_total_heads == 8
    assert a.summary() == {"model_type": arch, "layers": 2, "heads": 4, "kv_heads": kv, "d_head": d_head,
                           "d_model": 64, "output_projection": proj}
    names = {m: n for n, m in lm.model.named_modules()}
    for layer in range(a.n_layers):
        assert names[a.out_proj[layer]].endswith(f".{layer}.{names[a.attn[layer]].split('.')[-1]}."
                                                 f"{OUT_NAMES[arch]}")
        assert a.layers[layer] is lm.model.get_submodule(names[a.layers[layer]])
    assert a.lm_head is lm.model.get_output_embeddings()
    assert names[a.final_norm] == FINAL_NORMS[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_w_o_reproduces_the_output_projection(arch):
    """``out_proj(z) == z @ w_o.T + b_o`` whatever the layout (Conv1D stores W transposed)."""
    a = tiny(arch).arch
    torch.manual_seed(0)
    for layer in range(a.n_layers):
        z = torch.randn(5, a.n_heads * a.d_head)
        w = a.w_o(layer)
        assert w.shape == (a.d_model, a.n_heads * a.d_head) and w.dtype == torch.float32
        b = a.b_o(layer)
        ref = z @ w.T + (0 if b is None else b)
        with torch.no_grad():
            got = a.out_proj[layer](z)
        assert float((got - ref).abs().max()) <= 1e-5
        per_head = a.w_o_heads(layer)  # [H, d_h, d]
        assert per_head.shape == (a.n_heads, a.d_head, a.d_model)
        split = torch.einsum("bhk,hkd->bhd", z.reshape(5, a.n_heads, a.d_head), per_head).sum(1)
        assert float((split + (0 if b is None else b) - got).abs().max()) <= 1e-5


def test_biases_follow_the_architecture():
    assert tiny("llama").arch.b_o(0) is None  # o_proj without bias
    assert tiny("qwen2").arch.b_o(0) is None  # qwen2's biases are on q, k, v only
    for arch in ("gpt2", "gpt_neox"):
        b = tiny(arch).arch.b_o(1)
        assert b is not None and b.shape == (64,) and b.dtype == torch.float32 and float(b.abs().max()) > 0


def test_gemma_head_dim_comes_from_the_weight():
    lm = tiny("gemma")
    cfg = lm.model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 16
    assert lm.arch.d_head == 32 == cfg.head_dim
    assert lm.arch.w_o(0).shape == (64, 128)


def test_head_dim_read_from_weight_not_config():
    """A config that names no head_dim (GPT-2) still gets d_h from the weight; a config that disagrees fails."""
    lm = make_tiny("llama")
    lm.model.config.head_dim = 8  # the weights say 16
    with pytest.raises(UnsupportedArchitectureError, match="head_dim=8 disagrees") as e:
        detect_arch(lm.model)
    assert "\n" not in str(e.value)


def test_detects_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    lm = make_tiny("llama")
    pm = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["o_proj"]))
    a = detect_arch(pm)
    assert (a.n_layers, a.n_heads, a.d_head) == (2, 4, 16)
    assert a.summary()["output_projection"] == "Linear"
    assert hasattr(a.out_proj[0], "lora_A")


# --------------------------------------------------------------------------------------------------- errors
class _Cfg(types.SimpleNamespace):
    pass


class _Wrapper(nn.Module):
    def __init__(self, config, **children):
        super().__init__()
        self.config = config
        for k, v in children.items():
            setattr(self, k, v)


def _error(model) -> str:
    with pytest.raises(UnsupportedArchitectureError) as e:
        detect_arch(model)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("architecture 'toy'")
    return msg


def test_no_layers():
    model = _Wrapper(_Cfg(model_type="toy", num_attention_heads=2), encoder=nn.Linear(4, 4))
    assert "no decoder layer list found" in _error(model)


def test_layer_without_attention():
    layer = nn.Module()
    layer.mlp = nn.Linear(4, 4)
    model = _Wrapper(_Cfg(model_type="toy", num_attention_heads=2), transformer=nn.Module())
    model.transformer.h = nn.ModuleList([layer])
    assert "layer 0 has no attention module" in _error(model)


def _toy_layer(out_name="o_proj", norm=True, out_in=8):
    layer = nn.Module()
    layer.self_attn = nn.Module()
    setattr(layer.self_attn, out_name, nn.Linear(out_in, 8))
    if norm:
        layer.input_layernorm = nn.LayerNorm(8)
    return layer


def _toy_model(layer, **cfg):
    model = _Wrapper(_Cfg(model_type="toy", **cfg), model=nn.Module())
    model.model.layers = nn.ModuleList([layer])
    return model


def test_attention_without_output_projection():
    assert "has no output projection" in _error(_toy_model(_toy_layer(out_name="proj_out"), num_attention_heads=2))


def test_layer_without_input_norm():
    assert "no attention input norm" in _error(_toy_model(_toy_layer(norm=False), num_attention_heads=2))


def test_config_without_head_count():
    assert "names no head count" in _error(_toy_model(_toy_layer()))


def test_projection_not_a_multiple_of_heads():
    assert "not a multiple of 3 heads" in _error(_toy_model(_toy_layer(), num_attention_heads=3))


def test_minimal_toy_model_is_accepted():
    a = detect_arch(_toy_model(_toy_layer(out_in=12), num_attention_heads=3, num_key_value_heads=1))
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.d_head, a.d_model) == (1, 3, 1, 4, 8)
    assert a.final_norm is None


def test_w_o_is_cached_per_model_and_rebuilt_when_the_weights_change():
    """W_O (float32, LoRA merged) is built once per layer, not on every hooked forward; an in-place weight
    update (new version counter) or a swapped weight rebuilds it."""
    lm = make_tiny("llama")
    a = lm.arch
    first = a.w_o_heads(0)
    assert a.w_o_heads(0) is first  # cached
    assert a.w_o(0).data_ptr() == first.data_ptr()  # w_o is a view of the same cache
    with torch.no_grad():
        a.out_proj[0].weight.mul_(2.0)
    again = a.w_o_heads(0)
    assert again is not first
    torch.testing.assert_close(again, 2.0 * first)
    torch.testing.assert_close(a.w_o(0), a.out_proj[0].weight.float())
    a.out_proj[0].weight = nn.Parameter(torch.zeros_like(a.out_proj[0].weight))
    assert float(a.w_o_heads(0).abs().max()) == 0.0
