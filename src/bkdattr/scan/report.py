"""``scan.json`` and the scan's self-contained ``report.html`` (a Jinja template, ``templates/report.html.j2``; both
written atomically).

``scan.json``: ``verdict`` (``flagged``, ``not_found`` or ``incomplete``: :func:`bkdattr.scan.score.verdict`),
``flagged``, ``score``, ``threshold``, ``candidates`` (best first: ``trigger``, ``target``,
``kl``, ``changed_share``, ``agreement``, ``asr``, ``clean_asr``, ``effect``, ``source``; ``rule: "refusal"``
for a refusal-suppression candidate, ``rule: "label"`` with ``source_label`` and ``other_flips`` for a label-flip
candidate), ``refusal`` (the model's refusal rate on harmful-sounding requests and whether the refusal search
ran), ``label_flip`` (the model's accuracy on the news-topic probes and, when it classifies them, the label matrix
and the pair searched, else ``why_not``), ``targets`` (the
inverted targets, their ``Q`` and ``q_mean``; ``first_logp``, ``s0``, ``eligible``, ``searched`` where
examined), ``leaks`` (a sample), ``leak_triggers``, ``seconds`` (wall clock), ``work`` (forward work done, in the
budget's units), ``budget_work``, ``budget_s``, ``wall_limit_reached``, ``not_covered`` (what the budget did not
reach), ``phases`` (work and seconds of each step: gates, label_search, leak, targets, trigger_search, tests),
``model`` (the model source, to hand to ``bkdattr audit --from-scan``) and
``config``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from ..core.errors import ArtifactError
from ..core.io import atomic_path, write_json
from .config import FIRST_LOGP_MIN, TARGET_Q_MIN
from .families import family_of

FIELDS = ("flagged", "score", "threshold", "candidates", "leaks", "seconds")
COLUMNS = ("trigger", "target", "kl", "changed_share", "agreement", "asr", "clean_asr", "target_q", "counted", "source")


def write_scan(folder: str | Path, result: dict) -> Path:
    """Write ``folder/scan.json`` and ``folder/report.html``; returns the JSON path."""
    folder = Path(folder)
    write_json(folder / "scan.json", result)
    with atomic_path(folder / "report.html") as tmp:
        tmp.write_text(render_html(result), encoding="utf-8")
    return folder / "scan.json"


def read_scan(folder: str | Path) -> dict:
    """``scan.json`` of a scan folder (or the file itself); one-line :class:`ArtifactError` if unusable."""
    p = Path(folder)
    p = p / "scan.json" if p.is_dir() else p
    if not p.is_file():
        raise ArtifactError(f"no scan.json in {folder}; pass the --out folder of 'bkdattr scan'")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p} is not valid JSON ({e.msg}); run 'bkdattr scan' again") from None
    missing = [k for k in FIELDS if k not in data] if isinstance(data, dict) else list(FIELDS)
    if missing:
        raise ArtifactError(f"{p} lacks {', '.join(missing)}; it was not written by 'bkdattr scan'")
    return data


def _cell(v) -> Markup:
    """A table cell's text: a float to 3 decimals, anything else escaped (None as nothing)."""
    return Markup(f"{v:.3f}" if isinstance(v, float) else html.escape(str(v if v is not None else "")))


def target_text(c: dict) -> str:
    """What a candidate's target cell shows: its target, or what its family counts (refusal, label flip)."""
    return family_of(c).target_text(c)


def render_html(r: dict) -> str:
    """A self-contained page (``templates/report.html.j2``): the verdict, the candidates table, the inverted targets,
    leaks, what was skipped. The counted rule's figures are read from the scan's saved config (the defaults for a
    result without one)."""
    env = Environment(loader=PackageLoader("bkdattr.scan", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      keep_trailing_newline=True)
    env.filters["cell"] = _cell
    cfg = r.get("config") or {}
    rows = [[target_text(c) if k == "target" else c.get(k) for k in COLUMNS] for c in r["candidates"]]
    return env.get_template("report.html.j2").render(
        r=r, rows=rows, columns=COLUMNS, ref=r.get("refusal") or {}, lab=r.get("label_flip") or {},
        targets=r.get("targets", [])[:10], leaks=r["leaks"][:10], not_covered=r.get("not_covered", []),
        model=(r.get("model") or {}).get("label", ""), q_min=cfg.get("target_q_min", TARGET_Q_MIN),
        first_min=cfg.get("first_logp_min", FIRST_LOGP_MIN))
