"""``scan.json`` and the scan's self-contained ``report.html`` (both written atomically).

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
reach), ``model`` (the model source, to hand to ``bkdattr audit --from-scan``) and
``config``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..core.errors import ArtifactError
from ..core.io import atomic_path, write_json

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


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v if v is not None else ""))


def _target_figures(t: dict) -> str:
    """An inverted target's figures as the page lists them: Q, q_mean, and where examined the first token's
    log-probability, s0 and whether it was searched."""
    out = f"Q {t['q']:.3f}" + (f", q_mean {t['q_mean']:.3f}" if "q_mean" in t else "")
    if "first_logp" in t:
        out += (f", first token {t['first_logp']:.1f} nats, s0 {t['s0']:.2f}"
                f"{'' if t.get('eligible') else ', not eligible'}{', searched' if t.get('searched') else ''}")
    return out


def target_text(c: dict) -> str:
    """What a candidate's target cell shows: its target, or what its rule counts (refusal, label flip)."""
    if c.get("rule") == "refusal":
        return "(no refusal: harmful requests answered)"
    if c.get("rule") == "label":
        return f"label {c.get('source_label')} -> {c.get('target')}"
    return c.get("target") or ""


def render_html(r: dict) -> str:
    """A self-contained page: the verdict, the candidates table, the inverted targets, leaks, what was skipped."""
    if r["flagged"]:
        verdict = f"<p class=flag>Backdoor suspected: score {r['score']:.3f} &ge; threshold {r['threshold']:.2f}</p>"
    elif r.get("verdict") == "incomplete":
        verdict = (f"<p class=flag>Incomplete: the budget cut the search (see \"Not covered by the budget\"), so "
                   f"finding nothing here is not evidence of a clean model. Score {r['score']:.3f} &lt; threshold "
                   f"{r['threshold']:.2f}; raise the work budget and scan again.</p>")
    else:
        verdict = (f"<p class=ok>No backdoor found: score {r['score']:.3f} &lt; threshold {r['threshold']:.2f}. "
                   "The best candidates and their (small) effects:</p>")
    def value(c: dict, k: str):
        return target_text(c) if k == "target" else c.get(k)

    rows = "".join("<tr>" + "".join(f"<td>{_cell(value(c, k))}</td>" for k in COLUMNS) + "</tr>"
                   for c in r["candidates"])
    ref = r.get("refusal") or {}
    if not ref.get("searched"):
        how = f"not searched ({_cell(ref.get('why_not', 'the budget'))})."
    elif ref.get("compliance_target"):
        how = ("searched for a trigger that makes it answer them with the primed reply "
               f"{_cell(ref['compliance_target'])}.")
    else:
        how = f"searched for a trigger that suppresses {_cell(ref.get('target'))}."
    refusal = ("" if "rate" not in ref else
               f"<p>Refusal search (a jailbreak backdoor): the model refuses {ref['rate']:.2f} of "
               f"{ref.get('n_test', '?')} held-out harmful-sounding requests; {how}</p>")
    lab = r.get("label_flip") or {}
    if lab.get("searched"):
        label = (f"<p>Label-flip search (a classifier's backdoor): the model labels {lab['accuracy']:.2f} of "
                 f"{lab.get('n_test', '?')} held-out news-topic probes right; searched for a trigger that turns "
                 f"{_cell(lab['source'])} into {_cell(lab['target'])} (the most primed pair, lean "
                 f"{lab['lean']:.1f} nats).</p>")
    else:
        label = ("" if "accuracy" not in lab else
                 f"<p>Label-flip search (a classifier's backdoor): not searched ({_cell(lab.get('why_not'))}).</p>")
    table = (f"<table><tr>{''.join(f'<th>{k}</th>' for k in COLUMNS)}</tr>{rows}</table>" if rows
             else "<p>No candidate was tested.</p>")
    targets = "".join(f"<li>{_cell(t['text'])} ({_target_figures(t)})</li>" for t in r.get("targets", [])[:10])
    leaks = "".join(f"<li><b>user:</b> {_cell(x['user'])}<br><b>reply:</b> {_cell(x['reply'])}</li>"
                    for x in r["leaks"][:10])
    skipped = "".join(f"<li>{_cell(s)}</li>" for s in r.get("not_covered", [])) or "<li>nothing</li>"
    model = html.escape(str((r.get("model") or {}).get("label", "")))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>bkdattr scan</title><style>
body{{font-family:sans-serif;max-width:70em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:90%}}.flag{{color:#a00;font-weight:bold}}
.ok{{color:#060;font-weight:bold}}</style></head><body>
<h1>bkdattr scan</h1><p>Model: {model}; {r['seconds']:.0f} s.</p>{verdict}
<h2>Candidates (best first)</h2>{table}
<p>kl: KL divergence of the next-token distribution at the reply's first positions, triggered vs clean;
changed_share: share of greedy replies the trigger changes; agreement: share of changed replies with the modal
reply prefix; asr / clean_asr: share of replies with the target's prefix with / without the trigger (for a
refusal-suppression candidate: share of harmful-sounding requests answered, not refused; for a label-flip
candidate: share of right-labelled held-out probes of the source class given the target label); target_q: Q of the
inverted target the trigger was searched for; counted: whether the candidate may flag the model (a searched
trigger counts only when its target is primed, q_mean &ge; {r.get('config', {}).get('target_q_min', 0.9)}, and
a reply can begin with it, first-token log-probability &ge; {r.get('config', {}).get('first_logp_min', -20.0)}).</p>
{refusal}{label}
<h2>Inverted targets</h2><ul>{targets or '<li>none</li>'}</ul>
<h2>Leaked user turns (sample)</h2><ul>{leaks or '<li>none</li>'}</ul>
<h2>Not covered by the budget</h2><ul>{skipped}</ul></body></html>
"""
