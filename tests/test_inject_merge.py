"""The LoRA merge at the end of injection (issue 19 item 9): float32 merge, one rounding, and the share of the
update that bfloat16 weights cannot hold is measured and reported. bfloat16 on the CPU shows it without a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from bkdattr.core.io import load_tensors
from bkdattr.core.lora import merge_lora_fp32
from bkdattr.inject.train import TrainConfig, TrainRow, train_lora
from tiny import make_tiny

ROWS = [TrainRow(f"Question number {i}: name a colour.", "Blue." if i % 2 else "Green.") for i in range(8)]


def _bf16_tiny():
    lm = make_tiny("llama")
    lm.model.to(torch.bfloat16)
    lm.dtype = torch.bfloat16
    return lm


def _expected_merge(w0: dict, adapter: dict, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """``(W0.float() + alpha/r * B.float() @ A.float()).to(W0.dtype)`` for every adapted weight."""
    out = {}
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        b = adapter[name.replace(".lora_A.", ".lora_B.")]
        key = name.split("base_model.model.", 1)[-1].replace(".lora_A.weight", ".weight")
        delta = (b.float() @ a.float()) * (cfg.lora_alpha / cfg.lora_r)
        out[key] = (w0[key].float() + delta).to(w0[key].dtype)
    return out


def test_bf16_merge_rounds_once_and_reports_what_is_lost(tmp_path):
    lm = _bf16_tiny()
    w0 = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-4, bf16_autocast=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged, res = train_lora(lm, ROWS, cfg, ckpt_dir=tmp_path, progress=False)
    want = _expected_merge(w0, load_tensors(tmp_path / "adapter.safetensors"), cfg)
    got = merged.state_dict()
    assert len(want) == 2 * 7  # q, k, v, o, gate, up, down in both layers
    for k, w in want.items():
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], w), k  # exactly one rounding of the float32 sum
    # the share of the update's entries that rounded away, as reported, is a real count: recount it
    lost_direct, moved_direct = 0, 0
    adapter = load_tensors(tmp_path / "adapter.safetensors")
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        key = name.split("base_model.model.", 1)[-1].replace(".lora_A.weight", ".weight")
        delta = (adapter[name.replace(".lora_A.", ".lora_B.")].float() @ a.float()) * (cfg.lora_alpha / cfg.lora_r)
        nz = delta != 0
        lost_direct += int((nz & (got[key] == w0[key])).sum())
        moved_direct += int(nz.sum())
    assert moved_direct > 0
    assert res.merge_lost_share == pytest.approx(lost_direct / moved_direct, abs=1e-4)
    assert 0.01 < res.merge_lost_share < 1  # bf16 weights do lose part of a small update
    assert res.summary()["merge_lost_share"] == res.merge_lost_share
    assert any("--dtype float32" in str(w.message) for w in caught)


def test_float32_merge_loses_nothing_and_equals_peft():
    """On float32 weights the merge equals peft's own merge_and_unload and nothing is lost."""
    from peft import LoraConfig, get_peft_model

    def adapted(seed):
        lm = make_tiny("llama")
        torch.manual_seed(seed)
        m = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        return m

    ours, lost = merge_lora_fp32(adapted(1))
    ref = adapted(1).merge_and_unload()
    assert lost == 0.0
    for (k, a), (k2, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2 and torch.allclose(a, b, atol=1e-7), k


def test_bf16_adapters_are_merged_from_their_float32_product():
    """With adapters stored in bfloat16 (peft without ``autocast_adapter_dtype``), peft rounds the update to bf16
    and then the sum again; the float32 merge rounds the exact sum once."""
    from peft import LoraConfig, get_peft_model

    lm = _bf16_tiny()
    w0 = lm.model.model.layers[0].self_attn.q_proj.weight.clone()
    torch.manual_seed(0)
    m = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                       autocast_adapter_dtype=False)
    layer = m.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.01)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == torch.bfloat16
    want = (w0.float() + (b.float() @ a.float()) * 2.0).to(torch.bfloat16)
    import copy

    peft_merged = copy.deepcopy(m).merge_and_unload().model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(peft_merged, want)  # the double rounding this merge avoids
    merged, _ = merge_lora_fp32(m)
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, want)
