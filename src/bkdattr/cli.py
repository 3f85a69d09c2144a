"""Command-line interface: parses options, then calls the library. Errors print one ``error:`` line."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from .errors import BkdAttrError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Backdoor attribution for language models.")
console = Console(stderr=False)
_STATE = {"debug": False}

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, a local folder, a .gguf file or a hub id")
DeviceOpt = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto (accelerate device_map)")
DtypeOpt = typer.Option(None, "--dtype", help="float32 (CPU default), bfloat16 (GPU default), float16")
AdapterOpt = typer.Option(None, "--adapter", help="LoRA adapter folder, merged before analysis")
TrustOpt = typer.Option(False, "--trust-remote-code", help="allow the model's own Python code (off by default)")
ThreadsOpt = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    _STATE["debug"] = debug


def _load(model: str, device: str, dtype: str | None, adapter: str | None, trust: bool,
          threads: int | None = None):
    from ._runtime import set_threads
    from .models import load_model

    set_threads(threads)
    return load_model(model, adapter=adapter, dtype=dtype, device=device, trust_remote_code=trust)


@app.command()
def info(model: str = ModelOpt, device: str = DeviceOpt, dtype: str | None = DtypeOpt,
         adapter: str | None = AdapterOpt, trust_remote_code: bool = TrustOpt) -> None:
    """Print the architecture summary of a model."""
    lm = _load(model, device, dtype, adapter, trust_remote_code)
    t = Table(title=f"bkdattr info: {model}")
    t.add_column("field")
    t.add_column("value")
    for k, v in lm.summary().items():
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    console.print(t)


@app.command()
def generate(prompt: str = typer.Argument(..., help="user message"), model: str = ModelOpt,
             device: str = DeviceOpt, dtype: str | None = DtypeOpt, adapter: str | None = AdapterOpt,
             trust_remote_code: bool = TrustOpt, max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
             threads: int | None = ThreadsOpt) -> None:
    """Print a greedy chat reply."""
    from .generation import generate as gen

    lm = _load(model, device, dtype, adapter, trust_remote_code, threads)
    print(gen(lm, [prompt], max_new_tokens=max_new_tokens, progress=False)[0])


def _register_stage_commands() -> None:
    """Stage commands live beside their stages; each module adds itself to ``app`` if present."""
    import importlib

    for mod in ("bkdattr.inject.cli", "bkdattr.probe.cli", "bkdattr.attribution.cli", "bkdattr.control.cli",
                "bkdattr.pipeline_cli"):
        try:
            importlib.import_module(mod).register(app)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("bkdattr"):
                continue
            raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bkdattr`` console script."""
    _register_stage_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, standalone_mode=False)
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
    return 0


def usage_message(e: Exception) -> str:
    """One line for a command-line usage error, naming the ``--help`` to read."""
    msg = " ".join(e.format_message().split()) if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None) or "bkdattr"
    return f"{msg.rstrip('.')}; see '{path} --help'"


if __name__ == "__main__":
    sys.exit(main())
