"""CLI of the control stages: ``bkdattr ablate -r RUN`` and ``bkdattr vector -r RUN`` (parse, then call
:mod:`bkdattr.control.stage`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ...control.stage import AblationConfig, VectorConfig
from ..cli_options import stage_command


def register(app: typer.Typer) -> None:
    """Add ``bkdattr ablate`` and ``bkdattr vector`` to the app."""

    @stage_command(app, "ablate", AblationConfig)
    def ablate_cmd(options: dict, run: str) -> None:
        """Ablate the top-k heads by ACIE (and k random heads) at p(x); ASR vs k and clean side effects."""
        from ...control.stage import ablate_run
        from ...core.rundir import RunDir

        cfg = AblationConfig.from_options(options)
        m = ablate_run(RunDir(run), cfg)
        typer.echo("k     top-k ASR   random ASR (mean ± sd)")
        for k in m["ks"]:
            r = m["random"][str(k)]
            typer.echo(f"{k:<5} {m['topk'][str(k)]:>8.3f}   {r['mean']:.3f} ± {r['std']:.3f}")
        typer.echo(f"metrics: {Path(run) / 'metrics.json'} (ablation); figure: {Path(run) / m['figure']}")

    @stage_command(app, "vector", VectorConfig)
    def vector_cmd(options: dict, run: str) -> None:
        """Build the Backdoor Vector, sweep layers (add on clean, subtract on triggered) with controls."""
        from ...control.stage import vector_run
        from ...core.rundir import RunDir

        cfg = VectorConfig.from_options(options)
        m = vector_run(RunDir(run), cfg)
        t = m["test_asr_at_best_layer"]
        r = m["random_test_asr_at_best_layer"]
        typer.echo(f"|v| = {m['norms']['vector']:.1f} (k={m['k']}); best layer (val): {m['best_layer']}")
        typer.echo(f"test, triggered: ASR {t['baseline_triggered']:.3f} -> subtract v {t['subtract']:.3f} "
                   f"(random {r['subtract']:.3f})")
        typer.echo(f"test, clean:     ASR {t['baseline_clean']:.3f} -> add v {t['add']:.3f} (random {r['add']:.3f})")
        typer.echo(f"metrics: {Path(run) / 'metrics.json'} (vector); vector: {Path(run) / m['vector_file']}")
