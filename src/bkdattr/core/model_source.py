"""A model referenced, not copied: the source of an audit run (docs/METHOD.md section 5, "Audit").

An audit studies a model someone else built. Its run folder holds no weights: ``run.json`` records a
:class:`ModelSource` -- the model spec (the embedded ``smollm2-135m``, a local folder of full weights, a hub id
read from the local cache, or a ``.gguf`` file), an optional PEFT LoRA adapter folder, and a **fingerprint**:
SHA-256 over the config (``config.json``/``adapter_config.json``) and, for every weight file, its name, size,
first and last MiB. Every stage loads the model from the source and first recomputes the fingerprint; if the
files changed since the audit began, it stops with one line (:class:`ModelChangedError`).

Merging an adapter is slow for a large model, so the merged model is cached once under
``$BKDATTR_CACHE/models/audited-<fingerprint>`` (float32 safetensors) and later loads read that copy; a
``.gguf`` file is de-quantised once (:func:`bkdattr.core.models.gguf_cache`).

A suspect model is untrusted input: weights are read from safetensors or GGUF only; a folder (or adapter)
whose weights exist only as pickle files (``.bin``, ``.pt``, ``.pth``) is refused unless ``allow_pickle``
(then transformers reads them with ``torch.load(weights_only=True)``); ``trust_remote_code`` stays off unless
asked. Both choices are recorded in the run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BkdAttrError, ModelLoadError
from .lora import check_adapter_folder
from .models import (
    EMBEDDED_NAME,
    LoadedModel,
    cache_dir,
    digest_file,
    ensure_embedded_cache,
    load_model,
    looks_like_path,
    save_model_atomically,
)

SAFE_SUFFIXES = (".safetensors", ".gguf")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class ModelChangedError(BkdAttrError):
    """The audited model's files differ from the ones the audit began with."""


@dataclass
class ModelSource:
    """Where an audited model lives: ``spec`` (model), optional ``adapter`` folder, the fingerprint of both,
    and the two trust choices."""

    spec: str
    adapter: str | None = None
    fingerprint: str = ""
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSource:
        return cls(**{k: d.get(k, v) for k, v in asdict(cls("")).items()})

    @property
    def label(self) -> str:
        return self.spec + (f" + adapter {self.adapter}" if self.adapter else "")


def local_path(spec: str) -> Path:
    """The files behind a model spec: the embedded model's cached folder, a local folder or ``.gguf`` file, or
    a hub id's snapshot in the local Hugging Face cache (never downloaded)."""
    if spec == EMBEDDED_NAME:
        return ensure_embedded_cache()
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file() and not p.name.lower().endswith(".gguf"):
            raise ModelLoadError(f"'{spec}' is a file, not a model folder; pass a folder saved with save_pretrained "
                                 "or a file whose name ends in .gguf")
        return p
    if spec.lower().endswith(".gguf"):
        raise ModelLoadError(f"GGUF file not found: {spec}; check the path")
    if looks_like_path(spec):
        raise ModelLoadError(f"model folder not found: {spec}; check the path")
    try:
        from huggingface_hub import snapshot_download  # lazy: only a hub id needs it

        return Path(snapshot_download(spec, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except Exception:  # noqa: BLE001 -- any failure means: not in the local cache
        raise ModelLoadError(f"model '{spec}' is neither a local path nor in the local Hugging Face cache; pass a "
                             f"local model folder, a .gguf file or '{EMBEDDED_NAME}'") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model or adapter folder (safetensors, GGUF and pickle formats), sorted."""
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(SAFE_SUFFIXES
                                                                                           + PICKLE_SUFFIXES))


def check_weights(folder: Path, what: str, allow_pickle: bool) -> None:
    """One-line :class:`ModelLoadError` for a folder without weights, or with pickle weights only (unless
    ``allow_pickle``)."""
    files = weight_files(folder)
    if not files:
        raise ModelLoadError(f"{what} '{folder}' holds no weight file (.safetensors); save it again with "
                             "save_pretrained")
    if not any(f.name.lower().endswith(SAFE_SUFFIXES) for f in files) and not allow_pickle:
        names = ", ".join(f.name for f in files[:3])
        raise ModelLoadError(f"{what} '{folder}' has pickle weights only ({names}), which can run code when loaded; "
                             "convert them to safetensors, or pass --allow-pickle to read them with "
                             "torch.load(weights_only=True)")


def fingerprint(spec: str, adapter: str | None = None) -> str:
    """SHA-256 (hex) of the model's and the adapter's config files and weight files (name, size, first and last
    MiB): cheap for a 7B checkpoint, and changed by any re-save, fine-tune or swapped shard."""
    h = hashlib.sha256()
    for root, configs in ((local_path(spec), ("config.json",)),
                          (Path(adapter).expanduser() if adapter else None, ("adapter_config.json",))):
        if root is None:
            continue
        h.update(b"\1")
        if root.is_file():  # a .gguf file: config and weights in one
            digest_file(h, root)
            continue
        for name in configs:
            if (root / name).is_file():
                h.update((root / name).read_bytes())
        for f in weight_files(root):
            digest_file(h, f)
    return h.hexdigest()


def check_source(spec: str, adapter: str | None, allow_pickle: bool) -> None:
    """Fail before any model load: the model and adapter folders exist and hold loadable, trusted weights."""
    path = local_path(spec)
    if path.is_dir():
        check_weights(path, "model folder", allow_pickle)
    if adapter:
        check_adapter_folder(adapter, weights=False)  # the weights are checked here, pickle rule included
        check_weights(Path(adapter).expanduser(), "adapter folder", allow_pickle)


def open_source(spec: str, adapter: str | None = None, *, trust_remote_code: bool = False,
                allow_pickle: bool = False) -> ModelSource:
    """Check a model (and adapter) and fingerprint it: the :class:`ModelSource` an audit run records."""
    check_source(spec, adapter, allow_pickle)
    return ModelSource(spec, str(Path(adapter).expanduser().resolve()) if adapter else None, fingerprint(spec, adapter),
                       trust_remote_code, allow_pickle)


def verify(source: ModelSource) -> None:
    """:class:`ModelChangedError` when the files behind ``source`` no longer have its fingerprint."""
    try:
        now = fingerprint(source.spec, source.adapter)
    except ModelLoadError as e:
        raise ModelChangedError(f"the audited model {source.label} is gone ({e}); restore it or start a new audit") \
            from None
    if now != source.fingerprint:
        raise ModelChangedError(f"the audited model {source.label} changed since the audit began (fingerprint "
                                f"{source.fingerprint[:12]} -> {now[:12]}); restore its files or start a new audit")


def cached_copy(source: ModelSource) -> Path | None:
    """The cache folder holding the merged adapter of ``source`` (None without an adapter; a GGUF file alone is
    cached by :func:`bkdattr.core.models.gguf_cache`)."""
    if not source.adapter:
        return None
    return cache_dir() / "models" / f"audited-{source.fingerprint[:24]}"


def load_source(source: ModelSource, device: str | None = "cpu", dtype: str | None = None,
                check: bool = True) -> LoadedModel:
    """The model of ``source`` (fingerprint checked first); a merged adapter is built once into the cache
    (:func:`cached_copy`) and read from there afterwards (a GGUF file: :func:`bkdattr.core.models.gguf_cache`)."""
    if check:
        verify(source)
    spec, adapter = source.spec, source.adapter
    copy = cached_copy(source)
    if copy is not None:
        if not (copy / "config.json").is_file():
            lm = load_model(spec, adapter=adapter, dtype="float32", device="cpu",
                            trust_remote_code=source.trust_remote_code)
            save_model_atomically(lm.model, lm.tokenizer, copy)
            del lm
        spec, adapter = str(copy), None
    elif spec != EMBEDDED_NAME:
        spec = str(local_path(spec))
    lm = load_model(spec, adapter=adapter, dtype=dtype, device=device, trust_remote_code=source.trust_remote_code)
    lm.name = source.label
    return lm
