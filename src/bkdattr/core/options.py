"""One config system for every stage: :class:`StageOptions`, the profile resolution and ``--set`` parsing.

A stage config is a dataclass deriving from :class:`StageOptions` whose fields are declared peft-style,
``name: int = opt(32, "what it is")`` (``field(default=..., metadata={"help": ...})``); the CLI options are
generated from those fields (:mod:`bkdattr.app.cli_options`), so a new field is one line and gets its option,
its ``--set`` key and its pipeline key at once. Nested option groups (``InjectConfig.train``) are plain
dataclasses, addressed as ``train.epochs``.

Resolution (:func:`build`, :meth:`StageOptions.from_options`): dataclass default < the profile's value in
:mod:`bkdattr.core.profiles` < the user's option (None means "not given"). A field whose default is None takes the
profile's value in ``__post_init__``, so ``VectorConfig(profile="paper")`` is the paper config too.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from . import profiles
from .errors import ConfigError

#: run-wide options every stage receives (a stage ignores those it has no field for)
RUN_WIDE = ("model", "task", "profile", "seed", "device", "dtype", "threads", "progress")


def opt(default: Any = None, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with its help text (``factory``: a default factory for mutable defaults)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class StageOptions:
    """The run-wide fields every stage config has."""

    stage: ClassVar[str] = "stage"

    seed: int = opt(0, "seed of the prompt samples, splits and random controls")
    profile: str = opt("cpu", "cpu (the embedded model on 2 cores) or paper (the published settings)")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto (accelerate device_map)")
    dtype: str | None = opt(None, "float32 (CPU default), bfloat16 (GPU default) or float16")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice)")
    progress: bool = opt(True, "progress bars")

    def __post_init__(self) -> None:
        for name, value in profiles.defaults(self.profile, self.stage).items():
            if "." not in name and getattr(self, name) is None:
                setattr(self, name, value)

    @classmethod
    def from_options(cls, options: dict[str, Any]):
        """Build from the pipeline's or the CLI's options (see the module docstring; ``task`` picks the kind's
        profile entries); an unknown key is a one-line error listing the known ones."""
        return build(cls, options, cls.stage)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def nested(cls) -> dict[str, type]:
    """``{field name: dataclass}`` of the nested option groups of config class ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def option_names(cls) -> list[str]:
    """Every option of ``cls``: top-level fields and ``group.field`` for nested groups."""
    groups = nested(cls)
    return [f"{f.name}.{g.name}" if f.name in groups else f.name
            for f in dataclasses.fields(cls) for g in (dataclasses.fields(groups[f.name]) if f.name in groups
                                                       else [f])]


def _canonical(cls, key: str, groups: dict[str, type]) -> str:
    """``train_epochs`` (the older spelling) -> ``train.epochs``."""
    head, _, rest = key.partition("_")
    if "." not in key and head in groups and rest and key not in {f.name for f in dataclasses.fields(cls)}:
        return f"{head}.{rest}"
    return key


def build(cls, options: dict[str, Any], stage: str | None = None):
    """An instance of config class ``cls`` from ``options`` (None values dropped); ``stage`` names the
    profile table entry (None: no profile values)."""
    groups = nested(cls)
    opts = {_canonical(cls, k, groups): v for k, v in options.items() if v is not None}
    known = option_names(cls) + list(groups)  # a group also takes a whole mapping: mlp={"epochs": 2}
    unknown = [k for k in opts if k not in known and k not in RUN_WIDE]
    if unknown:
        what = stage or cls.__name__
        raise ConfigError(f"unknown {what} option(s) {unknown}; known: {', '.join(option_names(cls))}")
    values: dict[str, Any] = {}
    if stage is not None:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {k: v for k, v in profiles.defaults(opts.get("profile", defaults.get("profile", "cpu")), stage,
                                                     opts.get("task")).items() if defaults.get(k, 0) is not None}
    values.update({k: v for k, v in opts.items() if k in known})
    top = {k: v for k, v in values.items() if "." not in k}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, group in groups.items():
        sub = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(name + ".")}
        if sub or name in top:
            base = top.get(name) or {}
            # a group's options change the field's own default (its factory's values), not the group class's
            start = _group_default(fields[name], group)
            top[name] = dataclasses.replace(dataclasses.replace(start, **base) if isinstance(base, dict) else base,
                                            **sub)
    return cls(**top)


def _group_default(f: dataclasses.Field, group: type) -> Any:
    """The default instance of a nested option group's field ``f``."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default if f.default is not dataclasses.MISSING else group()


def parse_value(text: str) -> Any:
    """A ``--set`` value: a YAML scalar, list or ``{...}`` mapping (``3``, ``0.5``, ``null``, ``[0, 4]``,
    ``{epochs: 30}``), else the text. Text with a colon (``Current year: 2024.``) stays text: YAML would read
    it as a one-key mapping, which only braces ask for here."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, dict) and not text.lstrip().startswith("{"):
        return text
    return value


def parse_sets(sets: list[str], example: str = "n_prompts=64") -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: parsed value}``; one-line error for an item without ``=``."""
    out = {}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' is not key=value; write e.g. --set {example}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out
