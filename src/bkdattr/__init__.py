"""bkdattr: find, explain and switch off backdoors in fine-tuned language models.

Three layers, imports one way (docs/ARCHITECTURE.md): ``bkdattr.core`` (model loading, architecture adapter,
hooks, forward passes, decoding, scoring, run folders, options), one package per method (``inject``, ``probe``,
``attribution``, ``control``, ``audit``, ``scan``, ``disarm``) and ``bkdattr.app`` (CLI, pipeline, report).

The names below are the stable public ones: ``from bkdattr import load_model, encode_prompts,
capture_contributions``. Each is imported on first use, so ``import bkdattr`` loads no torch. The scan and the
audit are reached through their packages (``from bkdattr.scan import scan``, ``from bkdattr.audit import audit``):
a top-level function named like a subpackage would be replaced by the subpackage once it is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC: dict[str, str] = {
    "load_model": "bkdattr.core.models",
    "LoadedModel": "bkdattr.core.models",
    "Arch": "bkdattr.core.arch",
    "encode_prompts": "bkdattr.core.prompts",
    "render_prompt": "bkdattr.core.prompts",
    "capture_contributions": "bkdattr.core.hooks",
    "generate": "bkdattr.core.generation",
    "RunDir": "bkdattr.core.rundir",
    "Task": "bkdattr.inject.tasks",
    "load_splits": "bkdattr.inject.data",
    "attribute": "bkdattr.attribution.baha",
    "mean_contributions": "bkdattr.attribution.means",
    "Guard": "bkdattr.disarm.runtime",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bkdattr' has no attribute '{name}'")
    # lazy: the package face loads its public names on first use, so `import bkdattr` stays light
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
