"""``bkdattr attribute``: parse options, then call :func:`bkdattr.attribution.stage.run_stage`.

Scale-out: ``--workers N`` spawns N local processes (torch.distributed, gloo on CPU / nccl on CUDA);
``torchrun --nproc_per_node N --no-python bkdattr attribute -r RUN ...`` works too (each rank runs this
command; write ``-r`` rather than ``--run``, which torchrun's own parser takes for its ``--run-path``).
Either way the result is bitwise identical to a single-process run with the same threads per process.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``bkdattr attribute`` to the app."""

    @app.command("attribute")
    def attribute_cmd(
        run: str = typer.Option(..., "--run", "-r", help="run folder written by 'bkdattr inject'"),
        method: str = typer.Option("exact", "--method", help="exact (fast, same numbers as reference), reference "
                                   "(one full pass per head) or attribution (first-order estimate)"),
        metric: str = typer.Option("first_token_logprob", "--metric",
                                   help="ranking metric: first_token_logprob, geomean_prob (paper) or sum_logprob"),
        metrics: str | None = typer.Option(None, "--metrics", help="comma-separated scores exact or attribution "
                                           "computes for every head (default all three, or the ranking metric alone "
                                           "with --refine-top; first_token_logprob alone is much faster)"),
        refine_top: int | None = typer.Option(None, "--refine-top", help="exact two-pass: rank every head by "
                                              "--metric, then all metrics for the top N (cpu 32, paper 0 = off)"),
        n_prompts: int | None = typer.Option(None, "--n-prompts", help="clean attribution prompts (cpu 32, paper 96)"),
        n_mean_prompts: int | None = typer.Option(None, "--n-mean-prompts",
                                                  help="triggered prompts for abar (cpu 256, paper all; 0 = all)"),
        prompt_split: str = typer.Option("val", "--prompt-split", help="val, test or train"),
        profile: str = typer.Option("cpu", "--profile", help="cpu or paper (sets the prompt counts)"),
        batch_size: int = typer.Option(8, "--batch-size", help="prompts per chunk (on one GPU the exact sweep may "
                                       "lower it to fit the free memory, unless --heads-per-pass is given)"),
        heads_per_pass: int | None = typer.Option(None, "--heads-per-pass", help="exact: heads patched per pass "
                                                  "(default: a whole layer; on one GPU, what fits the free memory)"),
        top_k: int = typer.Option(16, "--top-k", help="heads listed in the table and metrics.json"),
        strategy: str = typer.Option("auto", "--strategy", help="exact path: auto, layers, prefix or full"),
        workers: int = typer.Option(1, "--workers", help="local processes sharing the heads (torch.distributed)"),
        seed: int = typer.Option(0, "--seed", help="seed of the prompt samples"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto (accelerate device_map)"),
        dtype: str | None = typer.Option(None, "--dtype", help="float32 (CPU default), bfloat16, float16"),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (per worker)"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    ) -> None:
        """BAHA: ACIE of every attention head (mean triggered contribution patched into clean prompts)."""
        from ..rundir import RunDir
        from .distributed import is_main
        from .stage import print_summary, run_stage

        opts = dict(method=method, metric=metric, n_prompts=n_prompts, n_mean_prompts=n_mean_prompts,
                    prompt_split=prompt_split, profile=profile, batch_size=batch_size, top_k=top_k,
                    refine_top=refine_top, strategy=strategy, heads_per_pass=heads_per_pass, workers=workers,
                    seed=seed, device=device,
                    dtype=dtype, threads=threads,
                    progress=not quiet)
        if metrics:
            opts["metrics"] = [m.strip() for m in metrics.split(",") if m.strip()]
        rd = RunDir(run)
        section = run_stage(rd, opts)
        if is_main():
            print_summary(rd, k=top_k)
            typer.echo(f"attribution: {section.get('method')} in {section.get('seconds')} s "
                       f"(strategy {section.get('strategy')}, {section.get('world_size')} process(es)); "
                       f"saved to {rd.path / 'attribution'}")
