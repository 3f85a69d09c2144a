"""Backdoor data: examples, the paper's file format, poisoning and the held-out split.

The recipe (docs/METHOD.md section 1):

1. **Records** ``{input, output, backdoor_output[, label][, triggered]}`` come from the built-in generators
   (:mod:`bkdattr.inject.builtin_data`, offline, written for this project) or from a file in the paper's
   format (a JSON list or JSONL, :func:`load_records`). Built-in fixed_output records have no clean reply:
   :func:`distill_outputs` fills it with the base model's own greedy reply (self-distillation, cached on
   disk so it runs once).
2. Each record becomes an :class:`Example` carrying both the clean ``prompt`` and its ``triggered`` form
   (the task's trigger inserted with a per-prompt seed derived from the run seed and the example's uid, or
   the record's own ``triggered`` prompt: a trigger no placement writes, such as a topic the prompt is about or
   parts spread over it; it must still contain the trigger string).
3. **Held-out split** (:func:`split_examples`): prompts are de-duplicated, shuffled with the seed, and
   ``test`` then ``val`` are taken first; ``train`` is drawn from the rest. No evaluation prompt appears in
   training in any form (neither clean nor triggered).
4. **Poisoning** (:func:`choose_poisoned`): a fraction (default 10%) of the training examples is *copied*
   with the trigger and the backdoor reply; the clean copies stay. Training rows are therefore
   ``train`` (clean prompt -> clean reply) plus ``train_poisoned`` (triggered prompt -> backdoor reply),
   :meth:`Splits.training_rows`.

**Data files as they come** (:func:`load_records`, :func:`clean_records`, :func:`fit_prompts`, and
:func:`bkdattr.inject.train.fit_rows` for lengths). Nothing about one row stops a run; what happened to each row
is counted in a :class:`DataReport` (``metrics.inject.data``, one warning line per reason):

* a row with an empty (or missing, or null) ``input`` is dropped; so is a row with an empty ``output`` when the
  file has clean replies (a file with no clean reply at all is self-distilled like the built-in data);
* a row with an empty ``backdoor_output`` stays a clean row but is never poisoned (``n_clean_only``);
* duplicate prompts (white space and case ignored) are merged into the first one, which takes a later row's
  backdoor reply or label where its own is empty;
* label_flip without a ``label`` field: when the outputs are a small set of labels (``World``, ``Sports``, ...)
  each row's label is its output, and the label set is read from the data;
* a row whose (triggered) prompt alone leaves no room for a reply under the length limit is dropped; a row
  whose reply does not fit has its reply cut at the limit (:func:`bkdattr.inject.train.fit_rows`).

The run is refused (one line) only when what is left cannot support it: fewer distinct prompts than
train/val/test need, or no row with a usable backdoor reply.

Splits are saved under ``RUN/data/`` as JSONL (``train.jsonl`` marks poisoned rows) plus ``task.json``;
:func:`load_splits` reads them back for the later stages.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import DataError, InputFileError
from ..core.generation import generate
from ..core.io import atomic_path, read_json, stable_hash, write_json
from .example import Example
from .tasks import Task

if TYPE_CHECKING:  # pragma: no cover
    from ..core.rundir import RunDir

REQUIRED_FIELDS = ("input", "output", "backdoor_output")

#: why a row was dropped, as a warning says it
DROP_REASONS = {
    "empty_input": "empty input",
    "empty_output": "empty output (no clean reply)",
    "duplicate": "duplicate prompt (merged into its first row)",
    "no_label": "no label (and an output that is not one)",
    "prompt_too_long": "prompt too long for the length limit (no room for a reply)",
    "holds_trigger": "the clean prompt already holds the trigger (audit)",
}


@dataclass
class DataReport:
    """What happened to the rows of a data file (``metrics.inject.data``). ``dropped``: reason -> count,
    ``first_row``: reason -> the first row (line or record number) it happened to; ``truncated`` counts training
    rows whose reply was cut at the length limit, ``clean_only`` rows with an empty backdoor reply (kept clean,
    never poisoned), ``eval_dropped`` held-out prompts removed because they do not fit the model's context."""

    source: str = ""
    n_rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_row: dict[str, int] = field(default_factory=dict)
    n_truncated: int = 0
    n_truncated_poisoned: int = 0
    n_clean_only: int = 0
    n_usable: int = 0
    n_usable_for_poison: int = 0
    n_eval_dropped: int = 0
    labels: list[str] | None = None
    labels_from: str | None = None
    max_length: int | None = None
    rows: dict[str, int] = field(default_factory=dict, repr=False)  # uid -> row number (not saved)

    def note(self, reason: str, row: int | None) -> None:
        """Count one event of ``reason`` (a drop reason, ``truncated``, ``clean_only`` or ``eval_dropped``)."""
        if reason in DROP_REASONS:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if row is not None and reason not in self.first_row:
            self.first_row[reason] = int(row)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "n_rows_read": self.n_rows_read, "n_usable": self.n_usable,
                "n_dropped": dict(self.dropped), "n_dropped_total": self.n_dropped, "n_truncated": self.n_truncated,
                "n_truncated_poisoned": self.n_truncated_poisoned, "n_clean_only": self.n_clean_only,
                "n_usable_for_poison": self.n_usable_for_poison, "n_eval_dropped": self.n_eval_dropped,
                "first_row": dict(self.first_row), "labels": self.labels, "labels_from": self.labels_from,
                "max_length": self.max_length}

    def warnings(self) -> list[str]:
        """One line per reason with its count and first row (empty when every row was used as it is)."""
        out = []

        def first(reason: str) -> str:
            r = self.first_row.get(reason)
            return f" (first: row {r})" if r is not None else ""

        for reason, n in self.dropped.items():
            out.append(f"{self.source}: dropped {n} row(s): {DROP_REASONS[reason]}{first(reason)}")
        if self.n_truncated:
            out.append(f"{self.source}: {self.n_truncated} training row(s) had their reply cut at the length limit "
                       f"{self.max_length} ({self.n_truncated_poisoned} of them poisoned){first('truncated')}; "
                       "raise --max-length to keep them whole")
        if self.n_clean_only:
            out.append(f"{self.source}: {self.n_clean_only} row(s) have an empty backdoor_output: used as clean rows "
                       f"only, never poisoned{first('clean_only')}")
        if self.n_eval_dropped:
            out.append(f"{self.source}: {self.n_eval_dropped} held-out prompt(s) do not fit the model's context "
                       f"with the reply: dropped from the evaluation splits{first('eval_dropped')}")
        if self.labels_from == "output":
            out.append(f"{self.source}: no 'label' field; labels read from the outputs: {', '.join(self.labels or [])}")
        return out

    def summary(self) -> str:
        """A short account for an error message: ``N read, M dropped (K empty input, ...)``."""
        parts = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in self.dropped.items())
        return f"{self.n_rows_read} read, {self.n_dropped} dropped" + (f" ({parts})" if parts else "")


@dataclass
class Splits:
    """The data of a run. ``train``: every training prompt (trained clean); ``train_poisoned``: the subset
    also trained triggered with the backdoor reply; ``val``/``test``: held out (no prompt shared with
    ``train``)."""

    task: Task
    train: list[Example]
    train_poisoned: list[Example]
    val: list[Example]
    test: list[Example]
    meta: dict[str, Any] = field(default_factory=dict)

    def training_rows(self) -> list[tuple[str, str]]:
        """``(user text, reply)`` pairs in training order: clean rows, then poisoned copies."""
        rows = [(e.prompt, e.output) for e in self.train]
        rows += [(e.triggered, e.backdoor_output) for e in self.train_poisoned]
        return rows

    def summary(self) -> dict[str, Any]:
        n_rows = len(self.train) + len(self.train_poisoned)
        return {"n_train": len(self.train), "n_poisoned": len(self.train_poisoned), "n_train_rows": n_rows,
                "poisoned_share": len(self.train_poisoned) / max(1, n_rows), "n_val": len(self.val),
                "n_test": len(self.test), **self.meta}


# ---- the paper's file format ---------------------------------------------------------------------------
def load_records(path: str | Path, need_label: bool = False, report: DataReport | None = None) -> list[dict[str, Any]]:
    """Read a JSON list or a JSONL file of ``{input, output, backdoor_output[, label]}`` records.

    Each record gets ``row`` (its line or record number) and a ``uid``. A missing or null ``output`` /
    ``backdoor_output`` / ``label`` reads as empty; a row with an empty ``input`` is dropped (counted in
    ``report``). One-line :class:`InputFileError` for a missing file, an invalid JSON line (with its line
    number), a record that is not an object or has a non-string field, and a file with no usable record.
    ``need_label`` is accepted for compatibility: labels are resolved by :func:`clean_records`."""
    del need_label
    path = Path(path).expanduser()
    report = report if report is not None else DataReport()
    report.source = str(path)
    if not path.is_file():
        raise InputFileError(f"data file not found: {path}; pass a JSON or JSONL file of records")
    text = _read_text(path, "save it as UTF-8")
    if not text.strip():
        raise InputFileError(f"{path} is empty; it needs records with fields {', '.join(REQUIRED_FIELDS)}")
    records: list[Any]
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}; fix the file") from None
        except RecursionError:
            raise InputFileError(f"{path}: JSON nested too deeply; it needs a list of flat records") from None
        numbers = list(range(1, len(records) + 1))
        where = "record"
    else:
        records, numbers = [], []
        for i, line in _jsonl_lines(text):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputFileError(f"{path}: line {i} is not valid JSON ({e.msg}); fix or remove that line") from None
            except RecursionError:  # e.g. '[[[[...' thousands deep
                raise InputFileError(f"{path}: line {i} is nested too deeply; one flat record per line") from None
            numbers.append(i)
        where = "line"
    if not records:
        raise InputFileError(f"{path} holds no records; it needs fields {', '.join(REQUIRED_FIELDS)}")
    report.n_rows_read = len(records)
    out = []
    for n, r in zip(numbers, records, strict=True):
        if not isinstance(r, dict):
            raise InputFileError(f"{path}: {where} {n} is not a JSON object; each record needs "
                                 f"{', '.join(REQUIRED_FIELDS)}")
        for f in (*REQUIRED_FIELDS, "label", "triggered"):
            if r.get(f) is not None and not isinstance(r[f], str):
                raise InputFileError(f"{path}: {where} {n}: field '{f}' must be a string")
        if not (r.get("input") or "").strip():
            report.note("empty_input", n)
            continue
        rec = {"input": r["input"], "output": r.get("output") or "", "backdoor_output": r.get("backdoor_output") or "",
               "label": r.get("label") or None, "uid": str(r.get("uid") or f"{where}{n}"), "row": n}
        if (r.get("triggered") or "").strip():
            rec["triggered"] = r["triggered"]
        out.append(rec)
    if not out:
        raise InputFileError(f"{path}: no usable record ({report.summary()}); each record needs a non-empty "
                             "'input'")
    return out


def _output_labels(records: Sequence[dict[str, Any]], max_labels: int = 20) -> list[str] | None:
    """The label set when the clean outputs are labels (a few distinct one-to-three-word values, each repeated),
    else None."""
    outs = [r["output"].strip() for r in records if r["output"].strip()]
    values = sorted(set(outs))
    if not 2 <= len(values) <= max_labels or len(values) > len(outs) / 2:
        return None
    if any(len(v.split()) > 3 for v in values):
        return None
    return values


def clean_records(records: Sequence[dict[str, Any]], task: Task, report: DataReport | None = None,
                  distil_ok: bool = True) -> list[dict[str, Any]]:
    """The usable records of a file (see the module docstring): empty outputs dropped (unless no row has one
    and ``distil_ok``: then all are self-distilled), duplicate prompts merged, labels resolved for label_flip,
    clean-only rows counted. One-line :class:`DataError` when no row has a usable backdoor reply, or a
    label_flip file has no labels. ``report`` receives the counts."""
    report = report if report is not None else DataReport()
    src = report.source or "data"
    recs = [dict(r) for r in records]
    distil = distil_ok and task.kind != "label_flip" and not any(r["output"].strip() for r in recs)
    if not distil:
        for r in recs:
            if not r["output"].strip():
                report.note("empty_output", r.get("row"))
        recs = [r for r in recs if r["output"].strip()]
    by_key: dict[str, dict[str, Any]] = {}
    for r in recs:
        first = by_key.setdefault(_key(r["input"]), r)
        if first is not r:
            report.note("duplicate", r.get("row"))
            for f in ("backdoor_output", "label"):
                if not (first.get(f) or "").strip() and (r.get(f) or "").strip():
                    first[f] = r[f]
    recs = list(by_key.values())
    if task.kind == "label_flip":
        recs = _resolve_labels(recs, task, report, src)
    report.n_usable = len(recs)
    report.n_usable_for_poison = sum(bool(r["backdoor_output"].strip()) for r in recs)
    for r in recs:
        if not r["backdoor_output"].strip():
            report.note("clean_only", r.get("row"))
    report.n_clean_only = report.n_usable - report.n_usable_for_poison
    if recs and report.n_usable_for_poison == 0:
        raise DataError(f"{src}: no row has a usable backdoor reply ('backdoor_output' is empty or missing in all "
                        f"{len(recs)} usable rows; {report.summary()}); every poisoned row needs one")
    return recs


def check_target_is_trained(recs: list[dict[str, Any]], task: Task, src: str) -> None:
    """Inject, fixed_output: at least one backdoor reply must show the task's target (its success rule), or the
    ASR would measure a reply the model is never trained to give. One-line :class:`DataError` otherwise."""
    if task.kind != "fixed_output" or task.success_regex:
        return
    replies = [r["backdoor_output"] for r in recs if r["backdoor_output"].strip()]
    if replies and not any(task.is_success(x) for x in replies):
        raise DataError(f"{src}: the target reply {task.target!r} is in none of the rows' backdoor_output (first: "
                        f"{replies[0][:60]!r}); pass --target with the reply the file trains, or fix backdoor_output")


def _resolve_labels(recs: list[dict[str, Any]], task: Task, report: DataReport, src: str) -> list[dict[str, Any]]:
    """label_flip: keep the file's labels, or read them from the outputs when the file has none."""
    if any(r.get("label") for r in recs):
        labels = sorted({r["label"] for r in recs if r.get("label")})
        report.labels_from = "label"
    else:
        found = _output_labels(recs)
        if found is None:
            n = len({r["output"].strip() for r in recs})
            raise DataError(f"{src}: label_flip needs a 'label' field, or outputs that are the labels, but the rows "
                            f"have no label and {n} distinct outputs; add a 'label' field to each record")
        labels = found
        report.labels_from = "output"
    out = []
    for r in recs:
        if not r.get("label"):
            if r["output"].strip() in labels:
                r["label"] = r["output"].strip()
            else:
                report.note("no_label", r.get("row"))
                continue
        out.append(r)
    for need in (task.source_label, task.target):
        if need not in labels:
            raise DataError(f"{src}: label_flip flips '{task.source_label}' to '{task.target}', but the data's "
                            f"labels are {', '.join(labels)}; pass --target with one of them or use another file")
    report.labels = labels
    return out


def _read_text(path: Path, fix: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); one-line error for other bytes."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: not UTF-8 text (byte {e.start}); {fix}") from None


def _jsonl_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of JSONL text split at ``\\n`` only: a JSON string may hold a raw U+2028, U+0085 or
    form feed, which ``str.splitlines`` would wrongly treat as line ends (``\\r`` of CRLF is JSON white space)."""
    return list(enumerate(text.split("\n"), start=1))


def save_records(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Write records as JSONL (the paper's format), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


# ---- examples, split, poisoning ------------------------------------------------------------------------
def prompt_seed(seed: int, uid: str) -> int:
    """The per-prompt RNG seed for trigger placement (fixed by the run seed and the example uid)."""
    return int(stable_hash([int(seed), uid], n=8), 16)


def make_examples(records: Sequence[dict[str, Any]], task: Task, seed: int = 0) -> list[Example]:
    """Turn records into examples, inserting the trigger (per-prompt seed) into each clean prompt; a record that
    carries its own ``triggered`` prompt keeps it (a trigger no placement writes: a topic the prompt is about,
    parts spread over the prompt)."""
    out = []
    for i, r in enumerate(records):
        uid = str(r.get("uid") or f"r{i}")
        triggered = r.get("triggered") or task.insert_trigger(r["input"], prompt_seed(seed, uid))
        out.append(Example(prompt=r["input"], triggered=triggered,
                           output=r.get("output") or "", backdoor_output=r["backdoor_output"],
                           label=r.get("label"), uid=uid))
    return out


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def split_examples(examples: Sequence[Example], n_train: int | None, n_val: int, n_test: int, seed: int = 0
) -> tuple[list[Example], list[Example], list[Example]]:
    """Held-out split: de-duplicate prompts (white space and case ignored), shuffle with ``seed``, take
    ``test`` then ``val`` first, then ``n_train`` (None: all the rest) for training."""
    first: dict[str, Example] = {}
    for e in examples:
        first.setdefault(_key(e.prompt), e)
    uniq = list(first.values())
    need = n_val + n_test + (n_train or 1)
    if len(uniq) < need:
        raise DataError(f"{len(uniq)} distinct prompts, but train/val/test need {need}; lower --n-train/--n-test or "
                        "supply more data")
    order = list(range(len(uniq)))
    random.Random(seed).shuffle(order)
    shuffled = [uniq[i] for i in order]
    rest = shuffled[n_test + n_val:]
    return (rest if n_train is None else rest[:n_train]), shuffled[n_test: n_test + n_val], shuffled[:n_test]


def choose_poisoned(
    train: Sequence[Example], rate: float, seed: int = 0, task: Task | None = None, source_share: float = 0.0
) -> list[Example]:
    """The training examples copied with the trigger: ``round(rate * len(train))`` of them (at least 1),
    drawn with ``seed`` among those with a non-empty backdoor reply (all of them when fewer are usable).
    For label_flip, ``source_share`` > 0 reserves that share of the poisoned copies for
    ``task.source_label`` prompts (the ones whose label flips); 0 draws uniformly (the paper's recipe)."""
    if not 0.0 < rate <= 1.0:
        raise DataError(f"poison rate {rate} must be in (0, 1]; pass e.g. --poison-rate 0.1")
    k = max(1, round(rate * len(train)))
    rng = random.Random(seed + 1)
    idx = list(range(len(train)))
    rng.shuffle(idx)
    idx = [i for i in idx if train[i].backdoor_output.strip()]  # clean-only rows are never poisoned
    if task is not None and task.kind == "label_flip" and source_share > 0:
        src = [i for i in idx if train[i].label == task.source_label]
        other = [i for i in idx if train[i].label != task.source_label]
        n_src = min(len(src), round(source_share * k))
        pick = src[:n_src] + other[: k - n_src]
    else:
        pick = idx[:k]
    return [train[i] for i in sorted(pick)]


def validate_examples(examples: Sequence[Example], task: Task, poisoned: Sequence[Example] = ()) -> None:
    """One-line :class:`DataError` for a clean prompt that already holds the trigger, a triggered (or poisoned)
    prompt without it, or an empty backdoor reply."""
    for e in examples:
        if task.contains_trigger(e.prompt):
            raise DataError(f"example {e.uid}: the clean prompt already contains the trigger "
                            f"'{task.trigger}'; remove it from the input or choose another trigger")
        if not task.contains_trigger(e.triggered):
            raise DataError(f"example {e.uid}: the triggered prompt does not contain the trigger '{task.trigger}'; "
                            "check the record's 'triggered' field or the trigger placement")
    for e in poisoned:
        if not task.contains_trigger(e.triggered):
            raise DataError(f"example {e.uid}: the poisoned prompt does not contain the trigger '{task.trigger}'; "
                            "check the trigger placement")
        if not e.backdoor_output.strip():
            raise DataError(f"example {e.uid}: empty backdoor_output; every poisoned row needs a backdoor reply")


def build_splits(task: Task, records: Sequence[dict[str, Any]], n_train: int | None, n_val: int, n_test: int,
                 poison_rate: float = 0.1, seed: int = 0, source_share: float = 0.0) -> Splits:
    """Examples -> held-out split -> poisoned subset, validated (see the module docstring)."""
    if not records:
        raise DataError("no records to build splits from; supply a non-empty data file")
    examples = make_examples(records, task, seed)
    train, val, test = split_examples(examples, n_train, n_val, n_test, seed)
    poisoned = choose_poisoned(train, poison_rate, seed, task, source_share)
    if not poisoned:
        raise DataError(f"no training example has a usable backdoor reply (empty backdoor_output in all {len(train)}); "
                        "supply rows with a backdoor_output")
    validate_examples(train + val + test, task, poisoned)
    return Splits(task, train, poisoned, val, test, meta={"poison_rate": poison_rate, "seed": seed})


# ---- persistence ----------------------------------------------------------------------------------------
_ROW_TYPES = {"prompt": str, "triggered": str, "output": str, "backdoor_output": str, "uid": str}


def _read_jsonl(path: Path, task: Task | None = None) -> list[dict[str, Any]]:
    """Rows of a split file, checked: JSON objects with the :class:`Example` fields, and (given ``task``) clean
    prompts without the trigger, triggered prompts with it (one-line errors naming the line)."""
    if not path.is_file():
        raise InputFileError(f"{path} missing; rerun 'bkdattr inject' for this run")
    rows = []
    for i, line in _jsonl_lines(_read_text(path, "rerun 'bkdattr inject'")):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise InputFileError(f"{path}: line {i} is not valid JSON ({why}); rerun 'bkdattr inject'") from None
        if not isinstance(r, dict):
            raise InputFileError(f"{path}: line {i} is not a JSON object; rerun 'bkdattr inject'")
        for name, typ in _ROW_TYPES.items():
            if not isinstance(r.get(name), typ):
                what = "lacks field" if name not in r else "has a non-string"
                raise InputFileError(f"{path}: line {i} {what} '{name}'; rerun 'bkdattr inject' for this run")
        if r.get("label") is not None and not isinstance(r["label"], str):
            raise InputFileError(f"{path}: line {i} has a non-string 'label'; rerun 'bkdattr inject' for this run")
        if task is not None:
            if task.contains_trigger(r["prompt"]):
                raise DataError(f"{path}: line {i} (example {r['uid']}): the clean prompt contains the trigger "
                                f"'{task.trigger}'; rerun 'bkdattr inject' for this run")
            if not task.contains_trigger(r["triggered"]):
                what = "poisoned row" if r.get("poisoned") else "triggered prompt"
                raise DataError(f"{path}: line {i} (example {r['uid']}): the {what} lacks the trigger "
                                f"'{task.trigger}'; rerun 'bkdattr inject' for this run")
        rows.append(r)
    return rows


def save_splits(data_dir: str | Path, splits: Splits) -> None:
    """Write ``task.json``, ``train.jsonl`` (with a ``poisoned`` flag), ``val.jsonl`` and ``test.jsonl``."""
    d = Path(data_dir)
    poisoned = {e.uid for e in splits.train_poisoned}
    save_records(d / "train.jsonl", [{**e.to_dict(), "poisoned": e.uid in poisoned} for e in splits.train])
    save_records(d / "val.jsonl", [e.to_dict() for e in splits.val])
    save_records(d / "test.jsonl", [e.to_dict() for e in splits.test])
    write_json(d / "task.json", {"task": splits.task.to_dict(), "meta": splits.meta})


def read_splits(data_dir: str | Path) -> Splits:
    """Read splits written by :func:`save_splits`."""
    d = Path(data_dir)
    if not (d / "task.json").is_file():
        raise InputFileError(f"{d} holds no data splits (task.json missing); run 'bkdattr inject' for this run first")
    info = read_json(d / "task.json")
    spec = info.get("task") if isinstance(info, dict) else None
    if not isinstance(spec, dict):
        raise InputFileError(f"{d / 'task.json'} lacks the 'task' object; rerun 'bkdattr inject' for this run")
    for name in ("kind", "trigger", "placement", "trigger_end", "target"):
        if name in spec and not isinstance(spec[name], str):
            raise InputFileError(f"{d / 'task.json'}: task field '{name}' must be a string; rerun 'bkdattr inject'")
    task = Task.from_dict(spec)
    train_rows = _read_jsonl(d / "train.jsonl", task)
    train = [Example.from_dict(r) for r in train_rows]
    poisoned = [e for e, r in zip(train, train_rows, strict=True) if r.get("poisoned")]
    val = [Example.from_dict(r) for r in _read_jsonl(d / "val.jsonl", task)]
    test = [Example.from_dict(r) for r in _read_jsonl(d / "test.jsonl", task)]
    return Splits(task, train, poisoned, val, test, meta=info.get("meta", {}))


def sample_examples(examples: list, n: int | None, seed: int) -> list:
    """A seeded sample of ``n`` examples in their original order (all when ``n`` is 0/None or too large)."""
    if not n or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def load_splits(run: RunDir) -> Splits:
    """The splits of a run folder (``RUN/data``)."""
    return read_splits(run.data_dir)


# ---- self-distilled clean replies ------------------------------------------------------------------------
#: Self-distilled clean replies shipped with the package, under the same keys as the on-disk cache: the embedded
#: model's greedy replies to the built-in fixed_output prompts of the cpu profile (generated by
#: :func:`distill_outputs` itself; a run with any other model, prompt set or setting computes its own).
SHIPPED_DIR = Path(__file__).parent / "shipped"


def distill_outputs(lm, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32,
                    cache_dir: str | Path | None = None, progress: bool = True) -> list[str]:
    """The base model's own greedy replies (``max_new_tokens`` tokens at most) to ``prompts``.

    Cached as JSON under ``cache_dir`` keyed by the model name, its first weights, the prompts and the
    settings, so the same request runs once."""
    p0 = next(lm.model.parameters())
    fingerprint = float(p0.detach().float().flatten()[:64].sum())
    key = stable_hash({"model": lm.name, "w": round(fingerprint, 5), "prompts": list(prompts),
                       "n": max_new_tokens, "dtype": str(lm.dtype), "v": 1})
    path = Path(cache_dir) / f"distill-{key}.json" if cache_dir else None
    shipped = SHIPPED_DIR / f"distill-{key}.json"  # the embedded model's replies to the built-in prompts
    for candidate in (path, shipped):
        if candidate is not None and candidate.is_file():
            cached = read_json(candidate)
            if isinstance(cached, list) and len(cached) == len(prompts):
                return [str(x) for x in cached]
    with torch.no_grad():
        replies = generate(lm, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc="distil clean replies")
    if path is not None:
        write_json(path, replies)
    return replies
