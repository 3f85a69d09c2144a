"""``bkdattr probe``: parse options, then call :func:`bkdattr.probe.stage.run_probe_stage`."""

from __future__ import annotations

from typing import Any

import typer

from ...probe.stage import ProbeStageConfig
from ..cli_options import stage_command


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_table(m: dict[str, Any]) -> None:
    """Per-layer table of the probe metrics section (test accuracy; AUROC of the main MLP probe)."""
    from rich.console import Console
    from rich.table import Table

    near = m.get("near_trigger") or {}
    cols: list[tuple[str, list | None]] = [
        ("MLP", m["mlp"]["in_layer_accuracy"]), ("SVM", m["svm"]["in_layer_accuracy"]),
        ("AUROC", m["mlp"]["auroc"]),
        ("ctrl MLP", (m.get("control") or {}).get("mlp", {}).get("in_layer_accuracy")),
        ("ctrl SVM", (m.get("control") or {}).get("svm", {}).get("in_layer_accuracy")),
        ("near MLP", near.get("mlp", {}).get("in_layer_accuracy")),
        ("near ctrl", (near.get("control") or {}).get("mlp", {}).get("in_layer_accuracy")),
        ("fires@near", (near.get("main_probe_fire_rate") or {}).get("mlp")),
    ]
    cols = [(name, vals) for name, vals in cols if vals is not None]
    sizes = m["split_prompts"]
    t = Table(title=f"bkdattr probe: test accuracy per layer ({m['feature_kind']}, {m['n_prompts']} prompts, "
                    f"split {sizes['train']}/{sizes['val']}/{sizes['test']})",
              caption="MLP/SVM: clean vs triggered, backdoored model; ctrl: the same on the clean base model; "
                      "near: triggered vs near-trigger prompts (MLP); fires@near: share of near-trigger test prompts "
                      "the main MLP probe calls triggered")
    t.add_column("layer", justify="right")
    for name, _ in cols:
        t.add_column(name, justify="right")
    for layer in range(m["n_layers"]):
        t.add_row(str(layer), *[_fmt(vals[layer]) for _, vals in cols])
    con = Console()
    con.print(t)
    s = m.get("summary", {})
    for name in ("backdoored", "control", "near_trigger", "near_trigger_control"):
        if name in s:
            con.print(f"mean test accuracy ({name}): MLP {s[name]['mlp']:.3f}, SVM {s[name]['svm']:.3f}", markup=False)
    for name, sec in (("backdoored", m), ("control", m.get("control"))):
        if sec:
            con.print(f"ICLA mean off-diagonal ({name}): MLP {sec['mlp']['icla_summary']['mean_off_diagonal']:.3f}, "
                      f"SVM {sec['svm']['icla_summary']['mean_off_diagonal']:.3f}", markup=False)
    con.print(f"probe stage: {m['seconds']:.1f} s", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``bkdattr probe`` to the app."""

    @stage_command(app, "probe", ProbeStageConfig, flags={"epochs": "mlp.epochs"})
    def probe_cmd(options: dict, run: str) -> None:
        """Per-layer MLP and SVM probes (trigger vs clean), ICLA matrices, clean-model and near-trigger controls."""
        from ...core.runtime import set_threads
        from ...probe.stage import run_probe_stage

        cfg = ProbeStageConfig.from_options(options)
        set_threads(cfg.threads)
        m = run_probe_stage(run, cfg, log=None if not cfg.progress else (lambda s: typer.echo(s, err=True)))
        print_table(m)
