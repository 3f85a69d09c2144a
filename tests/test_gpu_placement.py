"""Where load_model puts the weights on GPU machines (issue 19 items 6 and 12), checked on a CPU: torch.cuda
reports a fake GPU and the placement calls are spied on (nothing is ever moved to a GPU here)."""

from __future__ import annotations

import copy

import pytest
import torch

import bkdattr.core.models as models
from tiny import make_tiny


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    lm = make_tiny("llama")
    path = str(tmp_path_factory.mktemp("placement") / "llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def _spy_from_pretrained(monkeypatch) -> list[dict]:
    """Record from_pretrained's keyword arguments, then load on the CPU (there is no GPU)."""
    from transformers import AutoModelForCausalLM

    seen: list[dict] = []
    orig = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("device_map", None)
        return orig(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    return seen


@pytest.mark.parametrize("device, want", [("cuda", {"": "cuda:0"}), ("cuda:0", {"": "cuda:0"}), ("auto", "auto")])
def test_gpu_load_goes_straight_to_the_device(monkeypatch, fake_gpu, saved, device, want):
    """Item 12: ``--device cuda`` used to load the whole model into host RAM, then ``.to()`` it."""
    seen = _spy_from_pretrained(monkeypatch)
    moved: list[str] = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(str(a)) or self)
    lm = models.load_model(saved, device=device)
    assert seen[0]["device_map"] == want
    assert lm.dtype == torch.bfloat16  # the GPU default
    assert moved == []  # no second copy through host memory


def test_cpu_load_has_no_device_map(monkeypatch, saved):
    seen = _spy_from_pretrained(monkeypatch)
    lm = models.load_model(saved)
    assert "device_map" not in seen[0] and lm.device == torch.device("cpu")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A ``.gguf`` file whose de-quantisation (spied on) gives a tiny Llama; an empty cache."""
    tiny = make_tiny("llama")
    f = tmp_path / "model.gguf"
    f.write_bytes(b"fake")
    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []
    monkeypatch.setattr(models, "_plain_from_gguf", lambda folder, name: calls.append(name) or
                        (copy.deepcopy(tiny.model), tiny.tokenizer))
    return f, calls


def test_gguf_auto_is_split_over_the_gpus(monkeypatch, fake_gpu, fake_gguf):
    """Item 6: a GGUF model with ``--device auto`` used to stay on the CPU (in bfloat16); now it is loaded from
    its safetensors cache with accelerate's ``device_map="auto"``."""
    f, _calls = fake_gguf
    seen = _spy_from_pretrained(monkeypatch)
    lm = models.load_model(str(f), device="auto")
    assert seen[0]["device_map"] == "auto" and lm.dtype == torch.bfloat16


def test_gguf_auto_without_gpu_stays_on_cpu_in_float32(fake_gguf):
    f, _calls = fake_gguf
    lm = models.load_model(str(f), device="auto")
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32


def test_a_gguf_file_is_dequantised_once(fake_gguf):
    """Issue 13: a user's GGUF file was de-quantised again on every load (77 s for a 270M model, once per
    stage); the first load caches it as safetensors, keyed by the file's digest, and later loads read that."""
    f, calls = fake_gguf
    first = models.load_model(str(f))
    second = models.load_model(str(f))
    assert calls == ["model.gguf"]
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    f.write_bytes(b"fake, changed")  # another file: converted again
    models.load_model(str(f))
    assert calls == ["model.gguf", "model.gguf"]


# ---- on a real GPU (pytest -m cuda --device cuda; benchmarks/gpu_check.sh runs them; skipped otherwise) -------------
@pytest.mark.cuda
def test_cuda_load_puts_every_weight_on_the_gpu(saved, device):
    lm = models.load_model(saved, device=device)
    want = torch.device("cuda", torch.device(device).index or 0)
    assert {p.device for p in lm.model.parameters()} == {want}
    assert lm.dtype == torch.bfloat16 and lm.device == want


@pytest.mark.cuda
def test_cuda_target_logprob_and_loss_match_the_cpu(saved, device):
    """The evaluation log-probabilities and the training loss on the GPU equal the CPU's (float32 both)."""
    from bkdattr.inject.evaluate import target_logprob
    from bkdattr.inject.train import TrainRow, encode_rows, supervised_loss

    texts, targets = ["Name a fruit.", "Say hi."], ["Apple.", "Hi there!"]
    cpu = models.load_model(saved, dtype="float32")
    gpu = models.load_model(saved, device=device, dtype="float32")
    torch.testing.assert_close(target_logprob(gpu, texts, targets), target_logprob(cpu, texts, targets),
                               rtol=1e-4, atol=1e-4)
    b = encode_rows(cpu.tokenizer, [TrainRow(t, y) for t, y in zip(texts, targets, strict=True)], 256)
    with torch.no_grad():
        lg, lc = supervised_loss(gpu.model, b.to(gpu.device)), supervised_loss(cpu.model, b)
    torch.testing.assert_close(lg.cpu(), lc, rtol=1e-4, atol=1e-4)


def test_cuda_index_beyond_the_visible_gpus(monkeypatch, fake_gpu):
    from bkdattr.core.errors import ConfigError

    with pytest.raises(ConfigError, match="device 'cuda:3' asked for but only 1 GPU is visible"):
        models.resolve_device("cuda:3")
    assert models.resolve_device("cuda:0") == "cuda:0"
