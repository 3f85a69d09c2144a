"""CLI for the whole pipeline: ``bkdattr run``, ``bkdattr demo``, ``bkdattr report``."""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli_options import SETS


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(config: Path = typer.Argument(None, help="YAML config (optional: every option has a default)"),
                set_: list[str] = typer.Option([], "--set", help="override an option: key=value, e.g. "
                                               "inject.train.epochs=3")) -> None:
        """Run or resume all stages for one (model, task) into a run folder."""
        from ..pipeline import load_config, run_pipeline

        run = run_pipeline(load_config(config, set_))
        typer.echo(f"report: {run.path / 'report.html'}")

    @app.command("demo")
    def demo_cmd(task: str = typer.Option("fixed_output", "--task", help="fixed_output, jailbreak or label_flip"),
                 all_tasks: bool = typer.Option(False, "--all-tasks", help="run the three attack kinds"),
                 out: Path = typer.Option(Path("runs/demo"), "--out", help="parent folder of the run folders"),
                 set_: list[str] = typer.Option([], "--set", help="override an option: key=value"),
                 ) -> None:
        """The whole pipeline on the embedded model (cpu profile), then print where the report is."""
        from ...core.profiles import demo_sets
        from ..pipeline import load_config, run_pipeline

        tasks = ["fixed_output", "jailbreak", "label_flip"] if all_tasks else [task]
        for t in tasks:
            cfg = load_config(None, [*demo_sets(), f"task={t}", f"out={out / t}", *set_])
            run = run_pipeline(cfg)
            typer.echo(f"report: {run.path / 'report.html'}")

    @app.command("report")
    def report_cmd(run: Path | None = typer.Argument(None, help="a finished run folder"),
                   run_opt: Path | None = typer.Option(None, "--run", "-r", help="the same, as the other commands "
                                                        "take it"),
                   set_: list[str] = SETS) -> None:
        """Regenerate report.html and report.md from a run's artifacts (no model needed)."""
        from ...core.errors import ConfigError
        from ...core.options import parse_sets
        from ..report.html import build_report

        if run is not None and run_opt is not None and run != run_opt:
            raise ConfigError(f"two run folders given ({run} and --run {run_opt}); pass one")
        run = run or run_opt
        if set_:
            raise ConfigError(f"unknown report option(s) {list(parse_sets(set_))}; the report has no options")
        if run is None:
            raise ConfigError("no run folder given; pass one: bkdattr report RUN (or --run RUN)")
        html, md = build_report(run)
        typer.echo(f"report: {html}\nsummary: {md}")
