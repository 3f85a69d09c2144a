"""The options every analysis stage's config shares, and how a config is built from the pipeline's options.

A stage config (``AttributeConfig``, ``AblationConfig``, ``VectorConfig``) is a dataclass deriving from
:class:`StageOptions`; the pipeline passes it the stage's own options plus the run-wide ones
(:data:`RUN_WIDE`), of which a stage keeps the fields it has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError

#: run-wide pipeline options every stage receives (a stage ignores those it has no field for)
RUN_WIDE = ("model", "task", "profile", "seed", "device", "dtype", "threads")


@dataclass
class StageOptions:
    """Run-wide fields: ``seed``, ``profile`` (cpu | paper), ``device``, ``dtype`` (None: the device's
    default), ``threads`` (torch threads; None: torch's choice) and ``progress`` (progress bars)."""

    stage: ClassVar[str] = "stage"

    seed: int = 0
    profile: str = "cpu"
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    progress: bool = True

    @classmethod
    def from_options(cls, options: dict[str, Any]):
        """Build from stage options; a None value means the field's default, run-wide keys the stage has no field
        for are ignored, and any other unknown key is a one-line error listing the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in options if k not in names and k not in RUN_WIDE]
        if unknown:
            raise ConfigError(f"unknown {cls.stage} option(s) {unknown}; known: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
