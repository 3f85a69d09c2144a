"""Command-line interface: parses options, then calls the library. Errors print one ``error:`` line."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from ..core.errors import BkdAttrError
from .cli_options import ADAPTER, MODEL, TRUST, run_wide_option
from .commands import attribute, audit, control, disarm, inject, pipeline, probe, scan

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Backdoor attribution for language models.")
console = Console(stderr=False)
_STATE = {"debug": False}

DEVICE, DTYPE, THREADS = (run_wide_option(n) for n in ("device", "dtype", "threads"))


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    _STATE["debug"] = debug


def _load(model: str, device: str, dtype: str | None, adapter: str | None, trust: bool,
          threads: int | None = None):
    from ..core.models import load_model
    from ..core.runtime import set_threads, tune_allocator

    tune_allocator(device)
    set_threads(threads)
    return load_model(model, adapter=adapter, dtype=dtype, device=device, trust_remote_code=trust)


@app.command()
def info(model: str = MODEL, device: str = DEVICE, dtype: str | None = DTYPE, adapter: str | None = ADAPTER,
         trust_remote_code: bool = TRUST) -> None:
    """Print the architecture summary of a model."""
    lm = _load(model, device, dtype, adapter, trust_remote_code)
    t = Table(title=f"bkdattr info: {model}")
    t.add_column("field")
    t.add_column("value")
    for k, v in lm.summary().items():
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    console.print(t)


GUARD = typer.Option(None, "--guard", help="run folder: reply under its probe-gated guard (loads the run's model)")
GUARD_ACTION = typer.Option("vector", "--guard-action", help="what the guard does to a flagged prompt: vector or heads")


@app.command()
def generate(prompt: str = typer.Argument(..., help="user message"), model: str | None = typer.Option(
                 None, "--model", "-m", help="smollm2-135m (default), a local folder, a .gguf file or a hub id"),
             device: str = DEVICE, dtype: str | None = DTYPE, adapter: str | None = ADAPTER,
             trust_remote_code: bool = TRUST, max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
             threads: int | None = THREADS, guard: str | None = GUARD, guard_action: str = GUARD_ACTION) -> None:
    """Print a greedy chat reply (with --guard RUN: under that run's probe-gated guard)."""
    from ..core.generation import generate as gen

    if guard is None:
        lm = _load(model or "smollm2-135m", device, dtype, adapter, trust_remote_code, threads)
        print(gen(lm, [prompt], max_new_tokens=max_new_tokens, progress=False)[0])
        return
    from ..core.errors import ConfigError
    from ..core.rundir import RunDir
    from ..core.runtime import set_threads, tune_allocator
    from ..disarm.config import ACTIONS
    from ..disarm.runtime import guard_generate

    if model is not None or adapter is not None:
        raise ConfigError("--guard RUN replies with the run's own model; drop --model / --adapter")
    if guard_action not in ACTIONS:
        raise ConfigError(f"unknown --guard-action '{guard_action}'; use one of {', '.join(ACTIONS)}")
    run = RunDir(guard)
    tune_allocator(device)
    set_threads(threads)
    lm = run.load_model(device=device, dtype=dtype)
    print(guard_generate(lm, run, [prompt], max_new_tokens, guard_action)[0])


for _commands in (audit, scan, inject, probe, attribute, control, disarm, pipeline):
    _commands.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bkdattr`` console script."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # outside standalone mode click returns a command's typer.Exit code instead of exiting (the scan's 3 and 4)
        rc = app(args=argv, standalone_mode=False)
    except BkdAttrError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # usage errors of click (or the copy of click that typer >= 0.24 bundles)
        kinds = {c.__name__ for c in type(e).__mro__}
        if "ClickException" in kinds:
            print(f"error: {usage_message(e)}", file=sys.stderr)
            return 2
        if "Exit" in kinds:
            return int(getattr(e, "exit_code", 0) or 0)
        raise
    return rc if isinstance(rc, int) else 0


def usage_message(e: Exception) -> str:
    """One line for a command-line usage error, naming the ``--help`` to read."""
    msg = " ".join(e.format_message().split()) if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None) or "bkdattr"
    return f"{msg.rstrip('.')}; see '{path} --help'"


if __name__ == "__main__":
    sys.exit(main())
