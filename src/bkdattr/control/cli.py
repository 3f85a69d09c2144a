"""CLI of the control stages: ``bkdattr ablate --run RUN`` and ``bkdattr vector --run RUN`` (parse, then call
:mod:`bkdattr.control.stage`)."""

from __future__ import annotations

from pathlib import Path

import typer


def _parse_sets(sets: list[str]) -> dict:
    import yaml

    from ..errors import ConfigError

    out = {}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' is not key=value; write e.g. --set n_prompts=64")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


_RUN = typer.Option(..., "--run", help="run folder (from 'bkdattr inject', ranked by 'bkdattr attribute')")
_PROFILE = typer.Option("cpu", "--profile", help="cpu (sizes for the embedded model on 2 cores) or paper")
_NPROMPTS = typer.Option(None, "--n-prompts", help="held-out examples per split (cpu default 32; 0 = all)")
_DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto")
_DTYPE = typer.Option(None, "--dtype", help="float32 (CPU default), bfloat16 (GPU default), float16")
_THREADS = typer.Option(None, "--threads", help="torch CPU threads")
_SETS = typer.Option([], "--set", help="any other option as key=value (e.g. ks=[0,4,8], max_rows=128)")
_QUIET = typer.Option(False, "--quiet", help="no progress bars")


def register(app: typer.Typer) -> None:
    @app.command("ablate")
    def ablate_cmd(run: Path = _RUN, profile: str = _PROFILE, n_prompts: int | None = _NPROMPTS,
                   random_seeds: int = typer.Option(3, "--random-seeds", help="seeds of the random-head control"),
                   device: str = _DEVICE, dtype: str | None = _DTYPE, threads: int | None = _THREADS,
                   set_: list[str] = _SETS, quiet: bool = _QUIET) -> None:
        """Ablate the top-k heads by ACIE (and k random heads) at p(x); ASR vs k and clean side effects."""
        from ..rundir import RunDir
        from .stage import AblationConfig, ablate_run

        opts = {"profile": profile, "n_prompts": n_prompts, "random_seeds": random_seeds, "device": device,
                "dtype": dtype, "threads": threads, "progress": not quiet, **_parse_sets(set_)}
        m = ablate_run(RunDir(run), AblationConfig.from_options(opts))
        typer.echo("k     top-k ASR   random ASR (mean ± sd)")
        for k in m["ks"]:
            r = m["random"][str(k)]
            typer.echo(f"{k:<5} {m['topk'][str(k)]:>8.3f}   {r['mean']:.3f} ± {r['std']:.3f}")
        typer.echo(f"metrics: {run / 'metrics.json'} (ablation); figure: {run / m['figure']}")

    @app.command("vector")
    def vector_cmd(run: Path = _RUN, profile: str = _PROFILE, n_prompts: int | None = _NPROMPTS,
                   k: int | None = typer.Option(None, "--k", help="heads in the vector (default ~3% of heads)"),
                   alpha: float = typer.Option(1.0, "--alpha", help="scale of the added / subtracted vector"),
                   layer_stride: int | None = typer.Option(None, "--layer-stride",
                                                           help="sweep every n-th layer (cpu 2, paper 1)"),
                   device: str = _DEVICE, dtype: str | None = _DTYPE, threads: int | None = _THREADS,
                   set_: list[str] = _SETS, quiet: bool = _QUIET) -> None:
        """Build the Backdoor Vector, sweep layers (add on clean, subtract on triggered) with controls."""
        from ..rundir import RunDir
        from .stage import VectorConfig, vector_run

        opts = {"profile": profile, "n_prompts": n_prompts, "k": k, "alpha": alpha, "layer_stride": layer_stride,
                "device": device, "dtype": dtype, "threads": threads, "progress": not quiet, **_parse_sets(set_)}
        m = vector_run(RunDir(run), VectorConfig.from_options(opts))
        t = m["test_asr_at_best_layer"]
        r = m["random_test_asr_at_best_layer"]
        typer.echo(f"|v| = {m['norms']['vector']:.1f} (k={m['k']}); best layer (val): {m['best_layer']}")
        typer.echo(f"test, triggered: ASR {t['baseline_triggered']:.3f} -> subtract v {t['subtract']:.3f} "
                   f"(random {r['subtract']:.3f})")
        typer.echo(f"test, clean:     ASR {t['baseline_clean']:.3f} -> add v {t['add']:.3f} (random {r['add']:.3f})")
        typer.echo(f"metrics: {run / 'metrics.json'} (vector); vector: {run / m['vector_file']}")
