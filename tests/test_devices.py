"""Device per rank (issue 19 item 2) and the exact sweep's memory estimate (issue 19, "What to build 2").

Everything here runs on a CPU: the number of GPUs is a parameter of the pure functions, and the call sites are
driven with ``torch.cuda`` reporting fake GPUs (nothing is ever placed on them).
"""

from __future__ import annotations

import pytest
import torch

from bkdattr.attribution.exact_memory import exact_sweep_bytes, plan_exact, suggest_exact_batch
from bkdattr.core.devices import rank_device
from bkdattr.core.errors import ConfigError

GB = 1e9


# ---- item 2: device per rank ------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, local, n_gpus, world, want", [
    ("cpu", 0, 0, 1, "cpu"),
    ("cpu", 3, 8, 4, "cpu"),
    ("CUDA", 0, 1, 1, "cuda"),
    ("cuda:1", 0, 2, 1, "cuda:1"),
    ("auto", 0, 2, 1, "auto"),
    ("auto", 0, 0, 1, "auto"),
    ("auto", 1, 0, 2, "auto"),          # no GPU: accelerate keeps it on the CPU (gloo)
    ("cuda", 0, 4, 4, "cuda:0"),
    ("cuda", 3, 4, 4, "cuda:3"),
    ("auto", 1, 2, 2, "cuda:1"),        # several processes: one GPU each, not a split model per process
])
def test_rank_device_table(option, local, n_gpus, world, want):
    assert rank_device(option, local, n_gpus, world) == want


@pytest.mark.parametrize("option, local, n_gpus, world, words", [
    ("cuda:0", 1, 2, 2, "all 2 processes on GPU 0"),    # torchrun --device cuda:0: every rank on GPU 0
    ("cuda", 0, 2, 3, "--workers 2 or fewer"),          # more workers than GPUs
    ("auto", 0, 1, 2, "--workers 1 or fewer"),
    ("cuda:2", 0, 2, 1, "only 2 GPUs are visible"),     # a GPU that does not exist
    ("cuda", 0, 0, 1, "no CUDA GPU"),
    ("tpu", 0, 0, 1, "unknown device"),
    ("cuda:x", 0, 1, 1, "unknown device"),
])
def test_rank_device_errors_are_one_line(option, local, n_gpus, world, words):
    with pytest.raises(ConfigError) as e:
        rank_device(option, local, n_gpus, world)
    assert words in str(e.value) and "\n" not in str(e.value)


class _Stop(Exception):
    pass


class _FakeRun:
    def __init__(self):
        self.path = None

    def load_model(self, device="cpu", dtype=None):
        raise _Stop(device)


def _fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def _fake_torchrun(monkeypatch, local_rank, world):
    import bkdattr.attribution.stage as stage

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setattr(stage, "init_from_env", lambda device="cpu": True)
    monkeypatch.setattr(stage, "rank_world", lambda: (local_rank, world))
    monkeypatch.setattr(stage, "is_distributed", lambda: True)
    monkeypatch.setattr(stage, "load_splits", lambda run: None)
    monkeypatch.setattr(stage, "select_examples", lambda splits, cfg: ([], []))
    return stage


def test_attribute_run_torchrun_takes_the_local_rank_gpu(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    stage = _fake_torchrun(monkeypatch, 1, 2)
    with pytest.raises(_Stop) as e:
        stage.attribute_run(_FakeRun(), stage.AttributeConfig(device="cuda"))
    assert e.value.args[0] == "cuda:1"


def test_attribute_run_torchrun_refuses_one_pinned_gpu(monkeypatch):
    """``torchrun ... --device cuda:0`` used to load every rank on GPU 0."""
    _fake_gpus(monkeypatch, 2)
    stage = _fake_torchrun(monkeypatch, 1, 2)
    with pytest.raises(ConfigError, match="all 2 processes on GPU 0"):
        stage.attribute_run(_FakeRun(), stage.AttributeConfig(device="cuda:0"))


def test_workers_beyond_the_gpus_fail_before_spawning(monkeypatch):
    """``--workers 3`` on 2 GPUs used to spawn 3 processes, the third asking for cuda:2."""
    import bkdattr.attribution.stage as stage

    _fake_gpus(monkeypatch, 2)
    spawned = []
    monkeypatch.setattr(stage, "run_workers", lambda *a, **k: spawned.append(a))
    with pytest.raises(ConfigError, match="--workers 2 or fewer"):
        stage.run_stage(_FakeRun(), {"device": "cuda", "workers": 3})
    assert spawned == []


# ---- What to build 2: the exact sweep's memory -------------------------------------------------------------------
LLAMA7B = dict(n_layers=32, n_heads=32, d_model=4096, n_kv_heads=32, d_head=128, d_ff=11008, vocab=32000)


def _llama7b(batch=8, per_pass=32, dtype_bytes=2):
    m = LLAMA7B
    return exact_sweep_bytes(m["n_layers"], m["n_heads"], m["d_model"], m["n_kv_heads"], m["d_head"], 64, 16,
                             dtype_bytes, batch=batch, heads_per_pass=per_pass, d_ff=m["d_ff"], vocab=m["vocab"])


def test_memory_estimate_matches_the_issue_7b_figures():
    """Issue 19: Llama-2-7B, bf16, batch 8, 32 heads per pass, 64 + 16 tokens: weights 13.5 GB, prefix cache
    (the prompts' own and the copy tiled to 8 x 33 rows: 32 heads and a zero-patch replica) 9.1 GB, KV growth
    about 11 GB, peak about 34 GB; batch 16 about 55 GB; float32 about 68 GB."""
    m = _llama7b()
    assert 13.3 * GB < m.weights < 13.7 * GB          # 6.74 B parameters
    assert 8.9 * GB < m.prefix_cache < 9.3 * GB       # 2 L B (R+2) P kv d_h s = 8.5 GiB
    assert 10.9 * GB < m.replay_kv < 11.6 * GB
    assert 32 * GB < m.total < 38 * GB
    assert 52 * GB < _llama7b(batch=16).total < 60 * GB
    assert 64 * GB < _llama7b(dtype_bytes=4).total < 74 * GB
    # the cache parts scale with the rows per pass (batch x (heads + 1), + batch for the prefix), not the weights
    half = _llama7b(per_pass=16)
    assert half.weights == m.weights and half.prefix_cache * 34 == m.prefix_cache * 18


def test_memory_estimate_qwen_gqa():
    """Qwen2.5-7B (4 KV heads): about 18 GB at the same settings."""
    m = exact_sweep_bytes(28, 28, 3584, 4, 128, 64, 16, 2, batch=8, heads_per_pass=28, d_ff=18944, vocab=152064)
    assert 16.5 * GB < m.total < 19.5 * GB


@pytest.mark.parametrize("free_gb, fits, full", [(80, True, True), (40, True, False), (24, True, False),
                                                 (10, False, False)])
def test_suggest_exact_batch_by_free_memory(free_gb, fits, full):
    m = LLAMA7B
    s = suggest_exact_batch(m["n_layers"], m["n_heads"], m["d_model"], m["n_kv_heads"], m["d_head"], 64, 16, 2,
                            int(free_gb * GB), d_ff=m["d_ff"], vocab=m["vocab"])
    assert s.fits is fits
    assert ((s.batch_size, s.heads_per_pass) == (8, 32)) is full
    if fits:
        assert s.memory.total <= 0.85 * free_gb * GB
        # nothing with more rows per pass fits
        for b in range(1, 9):
            for r in (32, 16, 8, 4, 2, 1):
                if b * r > s.batch_size * s.heads_per_pass:
                    assert _llama7b(b, r).total > 0.85 * free_gb * GB


def test_plan_exact_on_a_tiny_model():
    from tiny import make_tiny

    lm = make_tiny("llama")
    prompts, targets = ["Name a fruit.", "What is two plus two?"], ["Apple.", "Four."]
    b, r, plan = plan_exact(lm, prompts, targets, 8, None, 10 * 1024**3)
    assert (b, r) == (8, lm.arch.n_heads) and plan["fits"]
    weights = sum(p.numel() * 4 for p in lm.model.parameters())
    b, r, plan = plan_exact(lm, prompts, targets, 8, None, weights)  # no room beyond the weights
    assert not plan["fits"] and (b, r) == (1, 1)
    b, r, plan = plan_exact(lm, prompts, targets, 4, 2, 10 * 1024**3)  # set by the user: kept
    assert (b, r) == (4, 2) and plan["prompt_tokens"] > 5 and plan["target_tokens"] >= 2


def test_attribute_stage_plans_the_exact_sweep_on_one_gpu(monkeypatch):
    """On one CUDA device with heads_per_pass unset, the stage takes the free-memory plan; otherwise it keeps the
    configured values (CPU, a set heads_per_pass, another method, a model split over GPUs)."""
    import dataclasses

    from bkdattr.attribution.stage import AttributeConfig, _memory_plan
    from tiny import make_tiny

    lm = make_tiny("llama")
    on_gpu = dataclasses.replace(lm, device=torch.device("cuda", 0))  # the weights stay on the CPU
    clean = [type("E", (), {"prompt": "Name a fruit.", "backdoor_output": "Apple."})()]
    weights = sum(p.numel() * 4 for p in lm.model.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (weights, 10 * weights))  # nothing free
    b, r, plan = _memory_plan(on_gpu, AttributeConfig(batch_size=8), clean)
    assert (b, r) == (1, 1) and plan["fits"] is False and plan["free_gib"] > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**34, 2**35))
    b, r, plan = _memory_plan(on_gpu, AttributeConfig(batch_size=8), clean)
    assert (b, r) == (8, lm.arch.n_heads) and plan["fits"]
    assert _memory_plan(lm, AttributeConfig(), clean) == (8, None, None)  # CPU: the configured values
    assert _memory_plan(on_gpu, AttributeConfig(method="reference"), clean) == (8, None, None)
    b, r, plan = _memory_plan(on_gpu, AttributeConfig(heads_per_pass=2), clean)  # set by the user: kept, estimated
    assert (b, r) == (8, 2) and plan["heads_per_pass"] == 2 and plan["fits"]
    lm.model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    assert _memory_plan(on_gpu, AttributeConfig(), clean) == (8, None, None)
