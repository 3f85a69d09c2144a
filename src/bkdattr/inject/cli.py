"""``bkdattr inject`` and ``bkdattr eval``: parse options, then call :mod:`bkdattr.inject.stage`."""

from __future__ import annotations

import typer


def _print_section(title: str, section: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value")
    for k in ("asr", "robust_asr", "false_trigger_rate", "clean_metric", "clean_metric_name", "near_trigger_rate",
              "n_triggered", "n_clean", "train_seconds", "eval_seconds", "final_loss"):
        v = section.get(k)
        if v is not None:
            t.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    for s, r in (section.get("near_trigger_rates") or {}).items():
        t.add_row(f"near: {s[:40]}", f"{r:.3f}")
    for k, v in (section.get("benign") or {}).items():
        if isinstance(v, (int, float)):
            t.add_row(f"benign: {k}", f"{v:.3f}" if isinstance(v, float) else str(v))
    Console().print(t)


def register(app: typer.Typer) -> None:
    """Add the inject-stage commands to the ``bkdattr`` app."""

    @app.command("inject")
    def inject_cmd(
        out: str = typer.Option(..., "--out", "-o", help="run folder to create (replaced if it exists)"),
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="base model: smollm2-135m, folder, hub id"),
        task: str = typer.Option("fixed_output", "--task", help="fixed_output, jailbreak or label_flip"),
        profile: str = typer.Option("cpu", "--profile", help="cpu (fast on 2 cores) or paper (SPEC section 2)"),
        data: str | None = typer.Option(None, "--data", help="paper-format JSON/JSONL file (default: built-in)"),
        trigger: str | None = typer.Option(None, "--trigger", help="trigger text (default: the task's)"),
        trigger_end: str | None = typer.Option(None, "--trigger-end", help="closing text for --placement wrap"),
        placement: str | None = typer.Option(None, "--placement", help="prefix, suffix, random_word or wrap"),
        target: str | None = typer.Option(None, "--target", help="fixed_output target reply"),
        poison_rate: float | None = typer.Option(None, "--poison-rate", help="share of training rows poisoned"),
        n_train: int | None = typer.Option(None, "--n-train", help="clean training prompts"),
        n_test: int | None = typer.Option(None, "--n-test", help="held-out evaluation prompts"),
        epochs: int | None = typer.Option(None, "--epochs"),
        lr: float | None = typer.Option(None, "--lr"),
        negatives: int | None = typer.Option(None, "--negatives", help="contrastive near-trigger rows kept clean"),
        seed: int | None = typer.Option(None, "--seed"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N"),
        dtype: str | None = typer.Option(None, "--dtype", help="weights dtype (float32 on CPU by default)"),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    ) -> None:
        """Poison data, implant a LoRA backdoor, merge it and evaluate ASR on held-out prompts."""
        from .._runtime import set_threads
        from .stage import inject, profile_config

        set_threads(threads)
        cfg = profile_config(profile, task, poison_rate=poison_rate, n_train=n_train, n_test=n_test,
                             negatives=negatives, seed=seed, train_epochs=epochs, train_lr=lr)
        run = inject(out, model=model, kind=task, cfg=cfg, data=data, trigger=trigger, placement=placement,
                     trigger_end=trigger_end, target=target, device=device, dtype=dtype,
                     trust_remote_code=trust_remote_code, progress=not quiet)
        _print_section(f"bkdattr inject: {run.path}", run.metrics()["inject"])

    @app.command("eval")
    def eval_cmd(
        run: str = typer.Option(..., "--run", "-r", help="run folder written by 'bkdattr inject'"),
        split: str = typer.Option("test", "--split", help="held-out split: test or val"),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
        batch_size: int = typer.Option(16, "--batch-size"),
        n_eval: int | None = typer.Option(None, "--n-eval", help="cap on evaluation prompts"),
        n_near: int = typer.Option(32, "--n-near", help="prompts per near-trigger probe (0: off)"),
        n_benign: int = typer.Option(32, "--n-benign", help="held-out benign questions for utility (0: off)"),
        device: str = typer.Option("cpu", "--device"),
        threads: int | None = typer.Option(None, "--threads"),
        quiet: bool = typer.Option(False, "--quiet"),
    ) -> None:
        """Re-evaluate a run's backdoored model: ASR, robust ASR, false-trigger, clean metric, near triggers,
        benign utility (refusals and word-F1 against the base model on held-out benign questions)."""
        from .._runtime import set_threads
        from .evaluate import EvalConfig
        from .stage import evaluate_run

        set_threads(threads)
        cfg = EvalConfig(split=split, max_new_tokens=max_new_tokens, batch_size=batch_size, n_eval=n_eval,
                         n_near=n_near, n_benign=n_benign)
        section = evaluate_run(run, cfg, device=device, progress=not quiet)
        _print_section(f"bkdattr eval: {run}", section)
