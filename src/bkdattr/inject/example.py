"""One prompt of a task: the clean user text, its triggered form and both replies (the record every stage reads)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class Example:
    """One prompt of a task: the clean user text and its triggered form, with both replies."""

    prompt: str
    triggered: str
    output: str
    backdoor_output: str
    label: str | None = None
    uid: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Example:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
