"""``bkdattr inject`` and ``bkdattr eval``: parse options, then call :mod:`bkdattr.inject.stage`."""

from __future__ import annotations

import typer

from ...inject.config import InjectConfig
from ...inject.evaluate import EvalConfig
from ..cli_options import MODEL, TRUST, stage_command


def _print_section(title: str, section: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value")
    for k in ("asr", "robust_asr", "false_trigger_rate", "clean_metric", "clean_metric_name", "near_trigger_rate",
              "n_triggered", "n_clean", "train_seconds", "eval_seconds", "final_loss", "epochs_trained"):
        v = section.get(k)
        if v is not None:
            t.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    stop = section.get("stop") or {}
    if stop.get("reason"):
        t.add_row("stopped because", str(stop["reason"]))
    data = section.get("data") or {}
    for k in ("n_rows_read", "n_truncated", "n_usable_for_poison", "n_dropped_total"):
        if data.get(k) is not None:
            t.add_row(f"data: {k}", str(data[k]))
    for s, r in (section.get("near_trigger_rates") or {}).items():
        t.add_row(f"near: {s[:40]}", f"{r:.3f}")
    for k, v in (section.get("benign") or {}).items():
        if isinstance(v, (int, float)):
            t.add_row(f"benign: {k}", f"{v:.3f}" if isinstance(v, float) else str(v))
    Console().print(t)


def register(app: typer.Typer) -> None:
    """Add the inject-stage commands to the ``bkdattr`` app."""

    flags = {"epochs": "train.epochs", "lr": "train.lr", "max_epochs": "train.max_epochs",
             "max_length": "train.max_length"}

    @stage_command(app, "inject", InjectConfig, flags=flags, own={
        "out": (str, typer.Option(..., "--out", "-o", "--run", "-r", help="run folder to create (replaced if it "
                                  "exists)")),
        "model": (str, MODEL),
        "task": (str, typer.Option("fixed_output", "--task", help="fixed_output, jailbreak or label_flip")),
        "data": (str | None, typer.Option(None, "--data", help="paper-format JSON/JSONL file (default: built-in)")),
        "trigger": (str | None, typer.Option(None, "--trigger", help="trigger text (default: the task's)")),
        "trigger_end": (str | None, typer.Option(None, "--trigger-end", help="closing text for --placement wrap")),
        "placement": (str | None, typer.Option(None, "--placement", help="prefix, suffix, random_word or wrap")),
        "target": (str | None, typer.Option(None, "--target", help="fixed_output target reply")),
        "trust_remote_code": (bool, TRUST)})
    def inject_cmd(options: dict, out: str, model: str, task: str, trust_remote_code: bool, **call) -> None:
        """Poison data, implant a LoRA backdoor, merge it and evaluate ASR on held-out prompts."""
        from ...core.runtime import set_threads
        from ...inject.stage import inject

        cfg = InjectConfig.from_options({**options, "task": task})
        set_threads(cfg.threads)
        run = inject(out, model=model, kind=task, cfg=cfg, trust_remote_code=trust_remote_code, **call)
        _print_section(f"bkdattr inject: {run.path}", run.metrics()["inject"])

    @stage_command(app, "eval", EvalConfig, also=("device", "dtype", "threads"))
    def eval_cmd(options: dict, run: str) -> None:
        """Re-evaluate a run's backdoored model: ASR, robust ASR, false-trigger, clean metric, near triggers,
        benign utility (refusals and word-F1 against the base model on held-out benign questions)."""
        from ...core.options import build
        from ...core.runtime import set_threads
        from ...inject.stage import evaluate_run

        set_threads(options.get("threads"))
        section = evaluate_run(run, build(EvalConfig, options), device=options.get("device", "cpu"),
                               dtype=options.get("dtype"), progress=options.get("progress", True))
        _print_section(f"bkdattr eval: {run}", section)
