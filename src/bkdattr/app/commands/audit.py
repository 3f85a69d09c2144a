"""``bkdattr audit``: parse options, then call :func:`bkdattr.audit.stage.audit`."""

from __future__ import annotations

import typer

from ...audit.stage import AuditConfig
from ..cli_options import ADAPTER, MODEL, TRUST, stage_command


def _print_audit(title: str, section: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cands = section.get("candidates") or []
    if len(cands) > 1:
        t = Table(title="candidate triggers (ASR on triggered test prompts)")
        for c in ("rank", "trigger", "ASR", "n"):
            t.add_column(c)
        for c in cands:
            t.add_row(str(c["rank"]), c["trigger"], f"{c['asr']:.3f}", str(c["n"]))
        console.print(t)
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value")
    for k in ("model", "trigger", "asr", "robust_asr", "false_trigger_rate", "near_trigger_rate", "clean_metric",
              "clean_metric_name", "n_triggered", "n_clean", "clean_reference"):
        v = section.get(k)
        t.add_row(k, "none (controls skipped)" if v is None and k == "clean_reference" else
                  f"{v:.3f}" if isinstance(v, float) else str(v))
    for s, r in (section.get("near_trigger_rates") or {}).items():
        t.add_row(f"near: {s[:40]}", f"{r:.3f}")
    for k, v in (section.get("benign") or {}).items():
        if isinstance(v, (int, float)):
            t.add_row(f"benign: {k}", f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add ``bkdattr audit`` to the app."""

    def option(*names: str, help: str) -> typer.Option:
        return typer.Option(None, *names, help=help)

    @stage_command(app, "audit", AuditConfig, flags={"max_new_tokens": "eval.max_new_tokens"}, own={
        "out": (str, typer.Option(..., "--out", "-o", "--run", "-r", help="run folder to create (replaced if it "
                                  "exists)")),
        "model": (str, MODEL),
        "adapter": (str | None, ADAPTER),
        "base_model": (str | None, option("--base-model", help="clean reference model for the controls (default: "
                                          "the model under --adapter; none: controls skipped)")),
        "trigger": (list[str], typer.Option([], "--trigger", help="known or suspected trigger (repeat for "
                                            "several candidates)")),
        "triggers_file": (str | None, option("--triggers", help="file of candidate triggers, one per line")),
        "placement": (str | None, option("--placement", help="prefix, suffix, random_word or wrap (default: the "
                                         "task's)")),
        "trigger_end": (str | None, option("--trigger-end", help="closing text for --placement wrap")),
        "task": (str | None, option("--task", help="fixed_output, jailbreak or label_flip: the kind's success "
                                    "rule and built-in prompts")),
        "target": (str | None, option("--target", help="fixed output the backdoor produces (normalised "
                                      "containment)")),
        "success_regex": (str | None, option("--success-regex", help="a reply succeeds when this regex matches")),
        "data": (str | None, option("--data", help="paper-format JSON/JSONL file (as inject reads it)")),
        "prompts": (str | None, option("--prompts", help="clean user prompts: text (one per line) or JSONL "
                                       "{\"input\": ...}")),
        "from_scan": (str | None, option("--from-scan", help="a 'bkdattr scan' folder: audit its top candidate "
                                         "(trigger, target as --target) on the scanned model")),
        "allow_pickle": (bool, typer.Option(False, "--allow-pickle", help="read pickle weights (.bin/.pt) with "
                                            "torch.load(weights_only=True)")),
        "trust_remote_code": (bool, TRUST)})
    def audit_cmd(options: dict, out: str, model: str, trigger: list[str], triggers_file: str | None,
                  task: str | None, from_scan: str | None, **call) -> None:
        """Audit a model you were given (checkpoint, GGUF, or base + LoRA adapter) for a known or suspected
        trigger: evaluate it, rank candidate triggers, and write a run folder for probe/attribute/ablate/vector."""
        from ...audit.inputs import read_triggers
        from ...audit.stage import audit
        from ...core.runtime import set_threads

        triggers = read_triggers(trigger, triggers_file)
        if from_scan:
            from ...scan.handoff import audit_call

            got = audit_call(from_scan, model=model, adapter=call.pop("adapter"), base_model=call.pop("base_model"),
                             triggers=triggers, task=task, target=call.pop("target"),
                             success_regex=call.get("success_regex"), prompts=call.pop("prompts"),
                             data=call.pop("data"))
            model, triggers, task = got.pop("model"), got.pop("triggers"), got.pop("kind")
            call.update(got)
        cfg = AuditConfig.from_options({**options, "task": task})
        set_threads(cfg.threads)
        run = audit(out, model, triggers, kind=task, cfg=cfg, **call)
        _print_audit(f"bkdattr audit: {run.path}", run.metrics()["audit"])
