"""The self-contained HTML report (figures embedded as base64, no network) and a Markdown summary.

``build_report(run)`` reads only what the stages wrote (``run.json``, ``metrics.json``, ``figures/*.png``,
``samples.json``); it loads no model, so it is cheap to regenerate (``bkdattr report RUN``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from ... import __version__
from ...core.io import atomic_path, read_json
from ...core.rundir import RunDir, get_nested
from .figures import FIGURE_NAMES
from .summary import MEMORY_KEYS, caveats, headline, setting_rows, stage_seconds


def _provenance(info: dict[str, Any]) -> list[tuple[str, str]]:
    """An audit run's provenance rows: the audited model, adapter, fingerprint, clean reference, triggers and
    the two trust choices."""
    src = info.get("model_source") or {}
    ref = info.get("clean_reference") or {}
    rows = [("audited model", str(src.get("spec"))), ("adapter", str(src.get("adapter") or "none")),
            ("fingerprint", f"sha256 {str(src.get('fingerprint', ''))[:16]}"),
            ("clean reference", (ref.get("spec", "") + (" (the base under the adapter)" if src.get("adapter")
                                                       else "")) if ref else
             "none: the probe's clean-model control and clean-utility comparisons are skipped")]
    triggers = info.get("triggers") or []
    if len(triggers) > 1:
        rows.append(("candidate triggers", "; ".join(triggers)))
    rows.append(("loading", f"trust_remote_code {'on' if info.get('trust_remote_code') else 'off'}, pickle weights "
                            f"{'allowed (weights_only)' if info.get('allow_pickle') else 'refused'}"))
    return rows


def _setting(info: dict[str, Any], m: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    audited = info.get("source") == "audit"
    keys = [] if audited else [("base model", "base_model")]
    keys += [("attack", "task"), ("trigger", "trigger"), ("profile", "profile"), ("seed", "seed"),
             ("device", "device")]
    out = []
    for label, key in keys:
        v = info.get(key)
        if isinstance(v, dict):
            v = v.get("kind", json.dumps(v))
        if v is not None:
            out.append((label, str(v)))
    return (_provenance(info) if audited else []) + out + setting_rows(m or {})


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "–"


def _tables(m: dict[str, Any]) -> list[dict[str, Any]]:
    tables = []
    cands = get_nested(m, "audit.candidates") or []
    if len(cands) > 1:
        tables.append({"title": "Candidate triggers: ASR on the triggered test prompts", "header": ["rank", "trigger",
                       "ASR", "prompts"], "rows": [[c["rank"], c["trigger"], _pct(c.get("asr")), c.get("n")]
                                                   for c in cands],
                       "note": "the run continues with the first; the controls below use it"})
    topk = get_nested(m, "ablation.topk")
    rnd = get_nested(m, "ablation.random")
    if isinstance(topk, dict) and topk:
        rows = []
        for k in sorted(topk, key=lambda x: int(x)):
            r = (rnd or {}).get(k) or (rnd or {}).get(str(k))
            mean = r.get("mean") if isinstance(r, dict) else r
            spread = r.get("std", r.get("spread")) if isinstance(r, dict) else None
            rows.append([k, _pct(topk[k]), _pct(mean) + (f" ± {100 * spread:.1f}" if spread is not None else "")])
        tables.append({"title": "Head ablation: ASR on triggered held-out prompts",
                       "header": ["k", "top-k by ACIE", "k random heads (mean ± sd)"], "rows": rows})
    tables += _defence_tables(m)
    add, sub = get_nested(m, "vector.add"), get_nested(m, "vector.subtract")
    radd, rsub = get_nested(m, "vector.random_add"), get_nested(m, "vector.random_subtract")
    if isinstance(add, (list, dict)) and add:
        layers = sorted(add.keys(), key=int) if isinstance(add, dict) else range(len(add))

        def at(x, layer):
            if isinstance(x, dict):
                return x.get(str(layer), x.get(layer))
            return x[layer] if isinstance(x, list) and layer < len(x) else None

        rows = [[str(layer), _pct(at(add, layer)), _pct(at(radd, layer)), _pct(at(sub, layer)), _pct(at(rsub, layer))]
                for layer in layers]
        tables.append({"title": "Backdoor Vector per layer (validation split)",
                       "header": ["layer", "add on clean", "random add", "subtract on triggered", "random subtract"],
                       "rows": rows,
                       "note": f"best layer (validation): {get_nested(m, 'vector.best_layer')}"})
    return tables


def _defence_tables(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The "Defences" table: each disarm strategy next to the undefended model and its random control, with the
    usefulness of its replies to triggered prompts and the re-scan of the defended weights."""
    d = m.get("disarm") or {}
    rows = []
    for name, sec in d.items():
        if not isinstance(sec, dict):
            continue
        ctl = sec.get("random_control")
        asr = f"{_pct(sec.get('asr'))} ({_pct(ctl.get('asr'))})" if ctl else _pct(sec.get("asr"))
        rows.append([f"{name} ({_how(name, sec)})", asr,
                     _pct(sec.get("near_trigger_asr")), _pct(sec.get("false_trigger_rate")),
                     _num(sec.get("clean_metric"), 3), _num(sec.get("perplexity_ratio"), 3),
                     _pct(sec.get("changed_reply_share")), _pct(sec.get("benign_refusal_rate")),
                     _num(sec.get("triggered_clean_metric"), 3), _num(sec.get("triggered_perplexity_ratio"), 2),
                     _rescan(name, sec)])
    if not rows:
        return []
    base = next(iter(d.values())).get("undefended") or {}
    rows.insert(0, ["undefended", _pct(base.get("asr")), _pct(base.get("near_trigger_asr")),
                    _pct(base.get("false_trigger_rate")), _num(base.get("clean_metric"), 3), "1.000", "0.0%",
                    _pct(base.get("benign_refusal_rate")), _num(base.get("triggered_clean_metric"), 3),
                    _num(base.get("triggered_perplexity_ratio"), 2), "-"])
    return [{"title": "Defences: held-out test prompts", "rows": rows,
             "header": ["defence", "ASR (random control)", "near-trigger ASR", "false-trigger rate", "clean metric",
                        "perplexity ratio", "clean replies changed", "benign refusals", "triggered clean metric",
                        "triggered perplexity ratio", "re-scan"],
             "note": "heads and vector are baked into the weights (every position, every step); the guard edits "
                     "flagged prompts only; repair, crow and fine_pruning are LoRA fine-tunes merged into the "
                     "weights (no random control). The random control is the same edit with k random heads or a "
                     "same-norm random vector (for the guard: behind the same detector). Triggered clean metric: the "
                     "clean metric of the replies to the triggered prompts against the clean references; triggered "
                     "perplexity ratio: the perplexity of those references after the triggered prompts over the "
                     "undefended clean perplexity (a defence that disarms by breaking the reply scores low and "
                     "high). Re-scan: bkdattr scan on the defended weights, its verdict and score"}]


def _how(name: str, sec: dict[str, Any]) -> str:
    """The setting of one defence, in a few words."""
    if name == "guard":
        plan = sec.get("guard") or {}
        edit = (f"alpha {plan.get('alpha')}" if plan.get("action") == "vector" else f"k={plan.get('k')}")
        return (f"probe L{plan.get('probe_layer')}, threshold {plan.get('threshold', float('nan')):.3f}, "
                f"{edit} at {'p(x)' if plan.get('scope', 'prompt') == 'prompt' else 'every position'}, "
                f"TPR {_pct(sec.get('true_positive_rate'))}, FPR {_pct(sec.get('false_positive_rate'))}, "
                f"overhead {_pct(sec.get('overhead'))}")
    if name in ("repair", "crow", "fine_pruning"):
        layers = sec.get("layers")
        where = "all layers" if layers in (None, "all") else f"layers {', '.join(str(x) for x in layers)}"
        extra = {"repair": f"{len(sec.get('triggers') or [])} trigger(s)",
                 "crow": f"alpha {sec.get('crow_alpha')}, epsilon {sec.get('crow_epsilon')}",
                 "fine_pruning": f"{_pct(sec.get('prune_share'))} of the MLP neurons of layers "
                                 f"{', '.join(str(x) for x in sec.get('pruned_layers') or [])}"}[name]
        return f"LoRA on {where}, {sec.get('rows')} rows, {extra}"
    return f"k={sec['k']}" if "k" in sec else f"layer {sec.get('layer')}, alpha {sec.get('alpha')}"


def _num(v: Any, digits: int) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"


def _rescan(name: str, sec: dict[str, Any]) -> str:
    r = sec.get("rescan")
    if isinstance(r, dict) and r.get("verdict"):
        return f"{r['verdict']} ({_num(r.get('score'), 2)})"
    return "n/a (no weight change)" if name == "guard" else "not run"


def _samples(run: RunDir) -> list[dict[str, Any]]:
    p = run.path / "samples.json"
    if not p.is_file():
        return []
    data = read_json(p)  # one-line InputFileError for a corrupt file
    return [{"prompt": s["prompt"], "replies": list(s["replies"].items())} for s in data]


def _figures(run: RunDir) -> list[dict[str, Any]]:
    figs = []
    for name, caption in FIGURE_NAMES.items():
        p = run.path / "figures" / f"{name}.png"
        data = base64.b64encode(p.read_bytes()).decode() if p.is_file() else None
        figs.append({"name": name, "caption": caption, "data": data})
    return figs


def task_kind(info: dict[str, Any]) -> str | None:
    """The attack kind of a run from its ``run.json`` (the task is stored as an object, or as a name)."""
    task = info.get("task")
    return task.get("kind") if isinstance(task, dict) else (task or info.get("kind"))


def timing_rows(timings: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(stage, seconds, peak RSS MiB, CUDA peak MiB)`` per stage of ``metrics.timings`` (``-`` where a figure
    was not recorded: runs from before the memory figures, or no CUDA)."""
    rss, cuda = (timings.get(k) if isinstance(timings.get(k), dict) else {} for k in MEMORY_KEYS)

    def fmt(v: Any) -> str:
        return f"{v:.0f}" if isinstance(v, (int, float)) else "-"

    return [(k, f"{v:.1f}", fmt(rss.get(k)), fmt(cuda.get(k))) for k, v in stage_seconds(timings).items()]


def build_report(run: RunDir | str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` into the run folder; return both paths."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    info = run.info()
    m = run.metrics()
    if "inject" not in m and "audit" in m:  # an audit's evaluation fills the headline's inject rows
        m = {**m, "inject": m["audit"]}
    timings = timing_rows(m.get("timings") or {})
    kind = task_kind(info)
    title = f"{info.get('base_model', '?')} / {kind or '?'}"
    if info.get("source") == "audit":
        title = f"audited model {title}"
    env = Environment(loader=PackageLoader("bkdattr.app.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        title=title, generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), version=__version__,
        setting=_setting(info, m), headline=headline(m, kind), caveats=caveats(m), figures=_figures(run),
        tables=_tables(m), samples=_samples(run), timings=timings,
    )
    html_path = run.path / "report.html"
    with atomic_path(html_path) as tmp:
        tmp.write_text(html)
    md_path = run.path / "report.md"
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_summary(title, info, m))
    return html_path, md_path


def markdown_summary(title: str, info: dict[str, Any], m: dict[str, Any]) -> str:
    """A short Markdown summary of the run (headline table, caveats, timings)."""
    lines = [f"# bkdattr report: {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in _setting(info, m)]
    lines += ["", "| Quantity | Value | Note |", "|---|---|---|"]
    lines += [f"| {q} | {v} | {n} |" for q, v, n in headline(m, task_kind(info))]
    lines += ["", "## Caveats", ""] + [f"- {c}" for c in caveats(m)]
    rows = timing_rows(m.get("timings") or {})
    if rows:
        lines += ["", "## Timings", "", "| Stage | Seconds | Peak RSS (MiB) | CUDA peak (MiB) |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", "Figures and sample generations: see report.html.", ""]
    return "\n".join(lines)
