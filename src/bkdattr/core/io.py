"""Safe, atomic artifacts: JSON, safetensors and npz, written to a temporary name then renamed.

Nothing here unpickles: loading uses safetensors, ``json`` and ``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import ArtifactError, InputFileError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    """Read a JSON file with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"file not found: {path}; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}; fix or regenerate the file") from None
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: not UTF-8 text (byte {e.start}); fix or regenerate the file") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically (tensors are made contiguous, on CPU)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, expect: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file; ``expect`` maps names to shapes that must match."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"file not found: {path}; check the path or rerun the stage that writes it")
    try:
        out = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise ArtifactError(f"{path}: not a readable safetensors file ({e}); delete it and rerun") from None
    for name, shape in (expect or {}).items():
        if name not in out:
            raise ArtifactError(f"{path}: tensor '{name}' missing; delete the file and rerun the stage")
        if tuple(out[name].shape) != tuple(shape):
            raise ArtifactError(f"{path}: tensor '{name}' has shape {tuple(out[name].shape)}, expected {tuple(shape)}; "
                                "it belongs to another model or config, delete it and rerun")
    return out


def tensor_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"file not found: {path}; check the path or rerun the stage that writes it")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise ArtifactError(f"{path}: not a readable safetensors file ({e}); delete it and rerun") from None


def check_metadata(path: str | Path, expected: dict[str, str]) -> dict[str, str]:
    """Refuse a safetensors artifact written for other inputs: every ``expected`` metadata entry (e.g. the
    config hash ``key`` it was computed for) must match, else :class:`ArtifactError`. Returns the metadata."""
    meta = tensor_metadata(path)
    for name, want in expected.items():
        got = meta.get(name)
        if got != str(want):
            raise ArtifactError(f"{path} was written for other inputs ({name} {got!r}, expected {str(want)!r}); "
                                "it is stale or foreign: delete it and rerun the stage")
    return meta


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Save numpy arrays (no object arrays), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load an npz file without pickle."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"file not found: {path}; check the path")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # object arrays (pickle), corrupt archives
        raise ArtifactError(f"{path}: not a plain numpy npz file ({_short(e)}); bkdattr never unpickles: delete it "
                            "and rerun the stage that writes it") from None


def _short(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:160]


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of a JSON-serialisable object (keys sorted), for keying cached artifacts."""
    data = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(data).hexdigest()[:n]


def swap_into_place(partial: Path, out: Path) -> None:
    """Rename the finished folder ``partial`` onto ``out``, replacing what was there (the old folder is moved
    aside first and deleted after, so ``out`` is never half-written)."""
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
