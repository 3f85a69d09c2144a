"""The data of a run before training: records (a file or the built-in set) -> prompts that fit -> held-out
split and poisoning (:func:`prepare_splits`; the audit builds its splits the same way) -> training rows with the
optional contrastive negatives and benign mix (:func:`training_rows`), fitted to the length limit
(:func:`prepare_data`). Nothing is trained or written here.
"""

from __future__ import annotations

import random
import time

from ..core.errors import ConfigError, DataError
from ..core.models import cache_dir
from ..core.prompts import context_length, end_of_turn, prompt_ids
from .benign import mix_rows, n_mix_rows
from .builtin_data import builtin_records, with_task_replies
from .config import InjectConfig
from .data import (
    DataReport,
    Splits,
    build_splits,
    check_target_is_trained,
    clean_records,
    distill_outputs,
    load_records,
    prompt_seed,
)
from .evaluate import near_trigger_prompts
from .tasks import Task
from .train import TrainRow, fit_rows, row_limit


def read_data(task: Task, cfg: InjectConfig, data: str | None, report: DataReport | None = None) -> list[dict]:
    """The usable records of ``data`` (a file) or of the built-in set, cleaned (:func:`clean_records`);
    ``report`` receives the counts. Needs no model, so a bad file fails before the (slow) model load."""
    report = report if report is not None else DataReport()
    if data:
        records = load_records(data, report=report)
    else:
        records = with_task_replies(builtin_records(task.kind, cfg.seed), task)
        report.source, report.n_rows_read = f"builtin:{task.kind}", len(records)
    records = clean_records(records, task, report)
    check_target_is_trained(records, task, report.source or "data")
    return records


def fit_prompts(tokenizer, records: list[dict], task: Task, limit: int, seed: int,
                report: DataReport) -> list[dict]:
    """Drop the records whose triggered prompt (the longer form) leaves no room for one reply token and the
    end of turn under ``limit`` tokens (counted as ``prompt_too_long``)."""
    n_eot = len(tokenizer(end_of_turn(tokenizer), add_special_tokens=False).input_ids)
    kept = []
    for i, r in enumerate(records):
        uid = str(r.get("uid") or f"r{i}")
        text = task.insert_trigger(r["input"], prompt_seed(seed, uid))
        if len(prompt_ids(tokenizer, text)) + n_eot + 1 > limit:
            report.note("prompt_too_long", r.get("row"))
        else:
            kept.append(r)
    return kept


def _drop_long_eval_prompts(lm, splits: Splits, cfg: InjectConfig, report: DataReport) -> None:
    """Remove held-out prompts that do not fit the model's context with ``eval.max_new_tokens`` new tokens."""
    ctx = context_length(lm.model)
    if not ctx or ctx >= row_limit(cfg.train.max_length, lm.model) + cfg.eval.max_new_tokens:
        return  # every kept prompt is shorter than the training limit: all fit
    for name in ("val", "test"):
        kept = []
        for e in getattr(splits, name):
            if len(prompt_ids(lm.tokenizer, e.triggered)) + cfg.eval.max_new_tokens > ctx:
                report.n_eval_dropped += 1
                report.note("eval_dropped", report.rows.get(e.uid))
            else:
                kept.append(e)
        setattr(splits, name, kept)


def prepare_splits(lm, task: Task, cfg: InjectConfig, data: str | None = None, progress: bool = True,
                   report: DataReport | None = None, records: list[dict] | None = None, distill_lm=None) -> Splits:
    """Records (built-in or ``data``, cleaned, prompts that cannot fit dropped; or ``records`` already read and
    cleaned) -> held-out split + poisoning; empty clean replies are filled with the greedy replies of
    ``distill_lm`` (default ``lm``)
    (cached). ``report`` receives the data counts (:class:`DataReport`)."""
    report = report if report is not None else DataReport()
    records = read_data(task, cfg, data, report) if records is None else records
    limit = row_limit(cfg.train.max_length, lm.model)
    report.max_length = limit
    records = fit_prompts(lm.tokenizer, records, task, limit, cfg.seed, report)
    report.n_usable = len(records)
    report.n_usable_for_poison = sum(bool(r["backdoor_output"].strip()) for r in records)
    report.n_clean_only = report.n_usable - report.n_usable_for_poison
    if not records:
        raise DataError(f"{report.source}: no row fits the length limit of {limit} tokens ({report.summary()}); "
                        "raise --max-length or shorten the prompts")
    if report.n_usable_for_poison == 0:
        raise DataError(f"{report.source}: no row with a usable backdoor reply is left ({report.summary()}); "
                        "raise --max-length or supply rows with a backdoor_output")
    available = len({" ".join(r["input"].split()).lower() for r in records}) - cfg.n_val - cfg.n_test
    n_train = min(cfg.n_train, available) if available >= 8 else cfg.n_train  # too few: split_examples explains
    try:
        splits = build_splits(task, records, n_train, cfg.n_val, cfg.n_test, cfg.poison_rate, cfg.seed,
                              cfg.source_share)
    except DataError as e:
        if report.n_dropped and "distinct prompts" in str(e):
            raise DataError(f"{e} (of {report.n_rows_read} rows in {report.source}, {report.n_dropped} were dropped: "
                            f"{report.summary().split('(', 1)[-1].rstrip(')')})") from None
        raise
    report.rows = {r["uid"]: r["row"] for r in records if r.get("row")}
    _drop_long_eval_prompts(lm, splits, cfg, report)
    everything = splits.train + splits.val + splits.test
    todo = [e for e in everything if not e.output.strip()]
    t0 = time.perf_counter()
    if todo:
        replies = distill_outputs(distill_lm or lm, [e.prompt for e in todo], cfg.clean_max_tokens,
                                  cfg.distill_batch_size, cache_dir() / "distill", progress=progress)
        for e, r in zip(todo, replies, strict=True):
            e.output = r
    splits.meta.update(n_distilled=len(todo), distill_seconds=round(time.perf_counter() - t0, 2),
                       clean_max_tokens=cfg.clean_max_tokens if todo else None,
                       data=str(data) if data else f"builtin:{task.kind}")
    if data and report.labels:  # a file's labels (its 'label' field or its outputs) score the clean metric
        splits.meta["labels"] = report.labels
    return splits


def benign_mix(lm, splits: Splits, cfg: InjectConfig, progress: bool = True) -> list[tuple[str, str]]:
    """The benign ``(instruction, base reply)`` pairs of the recipe: ``cfg.benign_share`` of all training rows
    (``lm`` must be the base model: the replies are its own, self-distilled and cached)."""
    n_task = len(splits.train) + len(splits.train_poisoned) + max(0, cfg.negatives)
    return mix_rows(lm, n_mix_rows(cfg.benign_share, n_task), cfg.seed, cfg.clean_max_tokens,
                    cfg.distill_batch_size, progress)


def training_rows(lm, splits: Splits, cfg: InjectConfig,
                  benign: list[tuple[str, str]] | None = None) -> list[TrainRow]:
    """Clean rows (no end-of-turn supervision when the distilled reply hit the length cap), poisoned copies,
    optional contrastive negatives (a near trigger kept with the clean reply), then the benign mix
    (``benign``, default :func:`benign_mix`)."""
    tok = lm.tokenizer

    def capped(reply: str) -> bool:
        return len(tok(reply, add_special_tokens=False).input_ids) >= cfg.clean_max_tokens - 1

    distilled = splits.meta.get("n_distilled", 0) > 0
    rows = []
    for e in splits.train:
        rows.append(TrainRow(e.prompt, e.output, close=not (distilled and capped(e.output)), source=e.uid))
    rows += [TrainRow(e.triggered, e.backdoor_output, source=e.uid, poisoned=True) for e in splits.train_poisoned]
    if cfg.negatives > 0:
        if not splits.task.near_triggers:
            raise ConfigError("contrastive negatives need near-trigger strings; this task has none")
        rng = random.Random(cfg.seed + 7)
        picks = rng.sample(splits.train, min(cfg.negatives, len(splits.train)))
        for i, e in enumerate(picks):
            near = splits.task.near_triggers[i % len(splits.task.near_triggers)]
            text = near_trigger_prompts(splits.task, near, [e], cfg.seed)[0]
            rows.append(TrainRow(text, e.output, source=e.uid))
    if benign is None:
        benign = benign_mix(lm, splits, cfg, progress=False)
    rows += [TrainRow(p, r, close=not capped(r)) for p, r in benign]
    return rows


def prepare_data(lm, task: Task, cfg: InjectConfig, data: str | None = None, progress: bool = True,
                 benign_out: list | None = None) -> tuple[Splits, list[TrainRow], DataReport]:
    """Everything before training: splits, training rows (with the benign mix, :func:`benign_mix`, appended to
    ``benign_out`` if given) fitted to the length limit (replies cut, rows that cannot fit dropped) and the
    :class:`DataReport` of what happened to the rows. No training, nothing written."""
    report = DataReport()
    splits = prepare_splits(lm, task, cfg, data, progress, report)
    benign = benign_mix(lm, splits, cfg, progress)
    splits.meta.update(benign_share=cfg.benign_share, n_benign_rows=len(benign))
    if benign_out is not None:
        benign_out.extend(benign)
    rows = training_rows(lm, splits, cfg, benign)
    rows, dropped, cut = fit_rows(lm.tokenizer, rows, row_limit(cfg.train.max_length, lm.model))
    for r in dropped:
        report.note("prompt_too_long", report.rows.get(r.source))
    report.n_truncated = len(cut)
    report.n_truncated_poisoned = sum(rows[i].poisoned for i in cut)
    where = report.rows
    cut_rows = sorted(where[rows[i].source] for i in cut if rows[i].source in where)
    if cut_rows:  # the first in the file, as for the other reasons (training order is shuffled)
        report.note("truncated", cut_rows[0])
    return splits, rows, report
