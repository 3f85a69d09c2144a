"""``bkdattr disarm``: parse options, then call :func:`bkdattr.disarm.stage.disarm_run`."""

from __future__ import annotations

import typer

from ...disarm.config import DisarmConfig
from ..cli_options import stage_command


def register(app: typer.Typer) -> None:
    """Add ``bkdattr disarm`` to the app."""

    @stage_command(app, "disarm", DisarmConfig, own={
        "run": (str, typer.Option(..., "--run", "-r", help="run folder (inject or audit) with attribution results")),
        "out": (str | None, typer.Option(None, "--out", "-o", help="defended model folder (default: "
                                         "RUN/disarm/STRATEGY; must be new or empty)"))})
    def disarm_cmd(options: dict, run: str, out: str | None) -> None:
        """Bake a defence into the weights (heads: zero the top-k heads; vector: subtract the Backdoor Vector as an
        output bias; repair: fine-tune triggered prompts to the clean replies; crow, fine_pruning: baselines) and
        measure it: test ASR, near-trigger ASR, false-trigger rate, clean utility, triggered replies' utility,
        random control, and a re-scan of the defended weights."""
        from rich.console import Console
        from rich.table import Table

        from ...disarm.stage import disarm_run
        from ...disarm.utility import FIGURES

        s = disarm_run(run, DisarmConfig.from_options(options), out)
        t = Table(title=f"bkdattr disarm ({s['strategy']}): {s.get('out') or 'no weights written (runtime guard)'}")
        for c in ("", "undefended", "defended", "random control"):
            t.add_column(c)
        for k in FIGURES:
            vals = [s["undefended"].get(k), s.get(k), (s.get("random_control") or {}).get(k)]
            t.add_row(k, *("-" if v is None else f"{v:.3f}" for v in vals))
        for k in ("true_positive_rate", "false_positive_rate", "overhead"):
            if k in s:
                t.add_row(k, "-", "-" if s[k] is None else f"{s[k]:.3f}", "-")
        if s.get("rescan"):
            t.add_row("re-scan", "-", f"{s['rescan']['verdict']} (score {s['rescan']['score']:.2f})", "-")
        Console().print(t)

    @app.command("export-vector")
    def export_vector_cmd(run: str = typer.Option(..., "--run", "-r", help="run folder with a Backdoor Vector"),
                          out: str = typer.Option(..., "--out", "-o", help="safetensors file to write"),
                          layer: int | None = typer.Option(None, "--layer", help="default: the best layer"),
                          scale: float | None = typer.Option(None, "--scale", help="default: the vector stage's "
                                                              "alpha")) -> None:
        """Write the Backdoor Vector with the metadata a plain forward hook needs (module, position, scale)."""
        from ...disarm.export import export_vector

        print(export_vector(run, out, layer, scale))
