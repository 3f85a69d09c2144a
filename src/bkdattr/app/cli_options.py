"""Command-line options generated from the stage configs' fields.

:func:`stage_command` registers a command whose options are one ``--field-name`` per scalar field of the
stage's config (help from the field's metadata, default None = the config's own default or the profile's,
shown in the help), plus ``-r/--run``, ``--set key=value`` for any option (nested ones too, ``train.lr=1e-3``)
and ``--quiet``. The options that are not config fields (``--model``, ``--adapter``, ``--trust-remote-code``)
are declared here once.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import typer

from ..core import profiles
from ..core.options import StageOptions, nested, parse_sets, parse_value
from ..core.runtime import tune_allocator

MODEL = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, a local folder, a .gguf file or a hub id")
ADAPTER = typer.Option(None, "--adapter", help="LoRA adapter folder, merged before analysis")
TRUST = typer.Option(False, "--trust-remote-code", help="allow the model's own Python code (off by default)")
RUN = typer.Option(..., "--run", "-r", help="run folder written by 'bkdattr inject'")
SETS = typer.Option([], "--set", help="any option as key=value (nested: train.lr=1e-3; lists: ks=[0,4,8])")
QUIET = typer.Option(False, "--quiet", help="no progress output")
def field_of(cls, path: str) -> dataclasses.Field:
    """The dataclass field ``path`` (``name`` or ``group.name``) of config class ``cls``."""
    head, _, rest = path.partition(".")
    return {f.name: f for f in dataclasses.fields(nested(cls)[head] if rest else cls)}[rest or head]


def _hint(cls, path: str) -> Any:
    head, _, rest = path.partition(".")
    return typing.get_type_hints(nested(cls)[head] if rest else cls)[rest or head]


def _scalar(cls, path: str) -> type | None:
    """The option type of a field: bool, int, float or str; None for anything else (given as YAML text)."""
    hint = _hint(cls, path)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    return args[0] if len(args) == 1 and args[0] in (bool, int, float, str) else None


def _parameter(cls, name: str, path: str, stage: str | None) -> inspect.Parameter:
    """The typer parameter of a field: default None, help from the field with its default (or the profiles')."""
    f = field_of(cls, path)
    kind = _scalar(cls, path) or str
    per = {p: profiles.defaults(p, stage).get(path) for p in profiles.PROFILES} if stage else {}
    if f.default is None and any(v is not None for v in per.values()):
        shown = ", ".join(f"{p} {v}" for p, v in per.items())
    else:
        shown = "" if f.default is None else str(f.default_factory() if f.default is dataclasses.MISSING else f.default)
    text = f.metadata.get("help", "") + (f" (default: {shown})" if shown else "")
    flag = f"--{name.replace('_', '-')}"
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind | None, default=typer.Option(
        None, flag + (f"/--no-{flag[2:]}" if kind is bool else ""), help=text, show_default=False))


def _value(cls, path: str, v: Any) -> Any:
    """A generated option's text -> the field's value: YAML (``[0, 4]``, ``null``) or comma-separated text for
    a list or tuple field (``0,4,8``; one item is a list of one)."""
    if v is None or _scalar(cls, path) is not None:
        return v
    parsed = parse_value(v)
    if isinstance(parsed, (str, int, float)) and str(_hint(cls, path)).startswith(("list[", "tuple[")):
        return [parse_value(x.strip()) for x in str(v).split(",") if x.strip()]
    return parsed


def stage_command(app: typer.Typer, name: str, cls: type, *, own: dict[str, tuple[Any, Any]] | None = None,
                  flags: dict[str, str] | None = None, also: tuple[str, ...] = ()
                  ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``bkdattr NAME`` for config class ``cls``; the decorated function gets ``(options, **own)``
    with ``options`` the given config options (``progress`` False with ``--quiet``) plus the ``--set`` ones.

    The options: every scalar top-level field of ``cls`` (``progress`` is ``--quiet``), ``flags``
    (``{option: "group.field"}``) for nested fields, ``also``: run-wide :class:`StageOptions` fields for a plain
    (nested) config; ``own``: ``{parameter: (type, typer.Option)}`` the command adds (default: ``-r/--run``)."""
    own = {"run": (str, RUN)} if own is None else own
    stage = getattr(cls, "stage", None)
    mapping = {f.name: (cls, f.name) for f in dataclasses.fields(cls) if f.name not in nested(cls)
               and f.name != "progress"}
    mapping.update({n: (cls, p) for n, p in (flags or {}).items()})
    mapping.update({n: (StageOptions, n) for n in also})

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        def command(**kw: Any) -> Any:
            options = {p: _value(c, p, kw.pop(n)) for n, (c, p) in mapping.items()}
            options = {k: v for k, v in options.items() if v is not None}
            if kw.pop("quiet"):
                options["progress"] = False
            options.update(parse_sets(kw.pop("set_")))
            tune_allocator(options.get("device"))
            return fn(options, **kw)

        params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=t, default=o)
                  for n, (t, o) in own.items()]
        params += [_parameter(c, n, p, stage if c is cls else None) for n, (c, p) in mapping.items()]
        params += [inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=list[str], default=SETS),
                   inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=QUIET)]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__doc__ = fn.__doc__
        command.__name__ = f"{name}_cmd"
        app.command(name)(command)
        command.options = mapping  # type: ignore[attr-defined]
        return command

    return decorate


def run_wide_option(name: str) -> Any:
    """A typer option for a run-wide field (``device``, ``dtype``, ``threads``) of a command with no stage
    config (``info``, ``generate``): default and help from :class:`StageOptions`."""
    f = field_of(StageOptions, name)
    return typer.Option(f.default, f"--{name}", help=f.metadata["help"])
