"""Process-level settings for stable CPU timings.

glibc's default allocator thresholds make torch timings on small VMs swing by up to 4x (memory is returned
to the OS and faulted back in on every large tensor). :func:`tune_allocator` raises the mmap and trim
thresholds with ``mallopt`` once per process. Only the ``bkdattr`` entry points call it (the CLI's commands and
:func:`bkdattr.app.pipeline.run_pipeline`); importing the package changes nothing. It is skipped on CUDA, and
``BKDATTR_NO_MALLOPT=1`` switches it off.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import torch

from .. import __version__

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator(device: str | None = "cpu") -> bool:
    """Apply the mallopt settings on Linux/glibc for a CPU run; return True when they were applied."""
    global _done
    if _done or os.environ.get("BKDATTR_NO_MALLOPT") == "1" or not sys.platform.startswith("linux"):
        return False
    torch = sys.modules.get("torch")
    if not str(device or "cpu").startswith("cpu") or (torch is not None and torch.cuda.is_initialized()):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        libc.mallopt(_M_TOP_PAD, 1024 * 1024 * 1024)
    except (OSError, AttributeError):
        return False
    _done = True
    return True


def set_threads(n: int | None) -> None:
    """Set torch's intra-op thread count (``None`` or 0 keeps torch's default, ``BKDATTR_THREADS`` wins)."""
    env = os.environ.get("BKDATTR_THREADS")
    if env:
        n = int(env)
    if n:
        torch.set_num_threads(int(n))


def versions() -> dict[str, str]:
    """The versions a run records: bkdattr, torch, transformers, peft and Python."""
    import peft  # lazy: peft and transformers take seconds to import; a run records their versions once
    import transformers  # lazy: as peft

    return {"bkdattr": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}
