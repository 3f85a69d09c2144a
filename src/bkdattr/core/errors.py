"""One error family for everything a user can get wrong.

Every message is one line that names the problem and the fix. The CLI prints ``error: <message>`` on stderr
and exits 2 (``--debug`` shows the traceback); library users catch :class:`BkdAttrError`.
"""

from __future__ import annotations


class BkdAttrError(Exception):
    """Base class: a user-facing problem with a one-line message naming the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputFileError(BkdAttrError):
    """A file is missing, unreadable or malformed (bad JSON, missing field, empty data)."""


class DataError(BkdAttrError):
    """Data content is unusable (poisoned row without its trigger, target longer than the context, ...)."""


class ModelLoadError(BkdAttrError):
    """A model, adapter or tokenizer could not be loaded."""


class UnsupportedArchitectureError(BkdAttrError):
    """The model's architecture lacks something bkdattr needs (layers, output projection, heads)."""


class ConfigError(BkdAttrError):
    """An option is out of range or inconsistent."""


class ArtifactError(BkdAttrError):
    """A saved artifact is stale, foreign or corrupt."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The informative line of an exception message (a ``size mismatch`` line when torch lists several)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    best = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(e).__name__)
    return best[:limit]
