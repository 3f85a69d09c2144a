"""The inject stage end to end: data -> (self-distilled clean replies) -> poisoning -> LoRA SFT -> merged
model -> held-out evaluation, written as a run folder.

The run is built in a hidden sibling folder ``.<name>.partial`` (its per-epoch checkpoint makes a rerun of
the same command resume) and renamed onto ``RUN`` only when complete, with ``metrics.json`` written last,
so nobody reads a half-written run. Re-injecting into an existing run folder replaces it whole (the old
stage results belong to the old model).

Defaults (:class:`InjectConfig`) are the ``cpu`` recipe, the cheapest measured to reach ASR >= 0.9 with
false-trigger <= 0.05 on the embedded model on 2 CPU cores: LoRA r=8, alpha=16 on q,k,v,o,gate,up,down, lr
2e-3 constant, batch 16, 2 epochs, bf16 autocast, 128 clean prompts + 25% poisoned copies (160 rows, 20%
poisoned), clean replies self-distilled and cut at 24 tokens. The ``paper`` profile (LoRA r=16, 16 epochs,
lr 1e-4, batch 8 x 4, 1000 prompts with 10% poisoned) and the per-kind changes are in :mod:`bkdattr.core.profiles`.

**Train until the backdoor holds** (``target_asr``, ``train.max_epochs``): the profile's ``epochs`` are always
trained (the recipe, tuned for a low false-trigger rate); after each epoch from then on, ASR, the false-trigger
rate and the kind's clean metric are measured on a validation slice (the first ``n_check`` prompts of ``val``).
A backdoor is a conditional behaviour, so training stops only when all three hold (:func:`backdoor_conditions`):
ASR >= ``target_asr``, false-trigger rate <= ``max_false_trigger``, and a clean metric of at least
``min_clean_share`` of the base model's (measured once, before training, on the same validation prompts). A model
that answers the target to every prompt reaches the ASR but not the other two. When they never hold together,
training goes on to ``max_epochs`` and ends with one warning line naming the failed conditions and their figures
(and a caveat in the report). ``metrics.inject.stop`` records every check, each condition and why training
stopped; ``metrics.inject.backdoor_check`` applies the same conditions to the final held-out figures, and the
report's headline says "not a clean backdoor" when they fail, whatever the stop said. The cpu profile aims at ASR
0.9 with false-trigger <= 0.1 within 6 epochs (:mod:`bkdattr.core.profiles`); the paper profile trains its 16 epochs
(no target). The
check adds one validation pass (32 + 32 greedy replies) after the planned epochs and changes nothing else: on
the built-in fixed_output data the demo's validation ASR is 1.00 after its 2 planned epochs, so it stops there
with the same weights and figures as without the rule (the check does not touch the training RNG streams,
which are reseeded per epoch).

**Data files** are read as they come (:mod:`bkdattr.inject.data`): what was dropped, merged, cut or kept clean
is counted in ``metrics.inject.data`` with one warning line per reason.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, DataError
from ..core.io import read_json, write_json
from ..core.options import StageOptions, opt
from ..core.rundir import RunDir
from ..core.runtime import versions
from .benign import reference as benign_reference
from .benign import run_reference, save_reference, utility
from .builtin_data import builtin_records, with_task_replies
from .data import (
    DataReport,
    Splits,
    build_splits,
    check_target_is_trained,
    clean_records,
    distill_outputs,
    load_records,
    load_splits,
    prompt_seed,
    save_splits,
)
from .evaluate import EvalConfig, clean_metric, evaluate
from .tasks import Task
from .train import TrainConfig, TrainRow, check_rows, fit_rows, row_limit, train_lora


@dataclass
class InjectConfig(StageOptions):
    """Everything that defines an injection besides the model and the data source; the defaults are the cpu
    recipe, :mod:`bkdattr.core.profiles` the paper one and the per-kind changes. Build it with
    :meth:`~bkdattr.core.options.StageOptions.from_options` (``task`` picks the kind's entries)."""

    stage = "inject"
    n_train: int = opt(128, "clean training prompts (capped by the data)")
    n_val: int = opt(32, "held-out validation prompts")
    n_test: int = opt(64, "held-out evaluation prompts")
    poison_rate: float = opt(0.25, "share of training prompts copied with the trigger")
    source_share: float = opt(0.0, "label_flip: share of poisoned copies reserved for Sports prompts")
    clean_max_tokens: int = opt(24, "length cap of self-distilled clean replies")
    distill_batch_size: int = opt(32, "prompts per batch when self-distilling clean replies")
    negatives: int = opt(0, "contrastive rows: a near-trigger string in a training prompt, kept with its "
                            "clean reply")
    benign_share: float = opt(0.0, "share of all training rows that are benign instructions with the base "
                                   "model's own replies (bkdattr.inject.benign)")
    train: TrainConfig = opt(help="LoRA training options", factory=TrainConfig)
    eval: EvalConfig = opt(help="evaluation options", factory=EvalConfig)

    target_asr: float | None = opt(None, "stop training once validation ASR reaches this (after the planned "
                                         "epochs, up to train.max_epochs); None or 0: no target")
    n_check: int = opt(32, "validation prompts checked after each epoch when target_asr is set")
    max_false_trigger: float | None = opt(None, "the stop also needs the validation false-trigger rate at or below "
                                                "this (None: not checked)")
    min_clean_share: float = opt(0.5, "the stop also needs the validation clean metric at or above this share of "
                                      "the base model's on the same prompts (0: not checked)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.train = dataclasses.replace(self.train, seed=self.seed)  # validates again
        self.eval = dataclasses.replace(self.eval, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train": self.train.to_dict()}

    def check(self) -> InjectConfig:
        """One-line :class:`ConfigError` for an out-of-range option (fields may be set after construction)."""
        if not 0.0 < self.poison_rate <= 1.0:
            raise ConfigError(f"poison rate {self.poison_rate} must be in (0, 1]; pass e.g. --poison-rate 0.1")
        if not 0.0 <= self.source_share <= 1.0:
            raise ConfigError(f"source_share {self.source_share} must be in [0, 1]")
        if not 0.0 <= self.benign_share < 1.0:
            raise ConfigError(f"benign_share {self.benign_share} must be in [0, 1); e.g. 0.25 for a quarter of rows")
        if self.target_asr is not None and not 0.0 <= self.target_asr <= 1.0:
            raise ConfigError(f"target ASR {self.target_asr} must be in [0, 1] (0: no target); pass e.g. "
                              "--target-asr 0.9")
        if self.max_false_trigger is not None and not 0.0 <= self.max_false_trigger <= 1.0:
            raise ConfigError(f"max_false_trigger {self.max_false_trigger} must be in [0, 1]; pass e.g. "
                              "--max-false-trigger 0.1")
        if not 0.0 <= self.min_clean_share <= 1.0:
            raise ConfigError(f"min_clean_share {self.min_clean_share} must be in [0, 1]; pass e.g. "
                              "--min-clean-share 0.5")
        for name, low in (("n_train", 1), ("n_test", 1), ("n_val", 0), ("clean_max_tokens", 1), ("negatives", 0),
                          ("n_check", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} {getattr(self, name)} must be >= {low}; pass a larger value")
        return self


def profile_config(profile: str, kind: str = "fixed_output", **overrides: Any) -> InjectConfig:
    """The :class:`InjectConfig` of ``profile`` for ``kind`` with ``overrides`` (``train.epochs`` or
    ``train_epochs`` for nested fields)."""
    return InjectConfig.from_options({**overrides, "profile": profile, "task": kind})


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
    from ..core.prompts import end_of_turn, prompt_ids

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
    from ..core.prompts import context_length, prompt_ids

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
    from ..core.models import cache_dir

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
    from .benign import mix_rows, n_mix_rows

    n_task = len(splits.train) + len(splits.train_poisoned) + max(0, cfg.negatives)
    return mix_rows(lm, n_mix_rows(cfg.benign_share, n_task), cfg.seed, cfg.clean_max_tokens,
                    cfg.distill_batch_size, progress)


def training_rows(lm, splits: Splits, cfg: InjectConfig,
                  benign: list[tuple[str, str]] | None = None) -> list[TrainRow]:
    """Clean rows (no end-of-turn supervision when the distilled reply hit the length cap), poisoned copies,
    optional contrastive negatives (a near trigger kept with the clean reply), then the benign mix
    (``benign``, default :func:`benign_mix`)."""
    import random

    from .evaluate import near_trigger_prompts

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


def validation_check(lm, splits: Splits, cfg: InjectConfig) -> dict[str, Any] | None:
    """ASR, false-trigger rate and clean metric of the current model on the first ``cfg.n_check`` validation
    prompts (ASR and false-trigger rate on the kind's counted subset, the clean metric on all of them), greedy,
    ``cfg.eval.max_new_tokens`` tokens. None when the slice has no counted prompt."""
    from ..core.generation import generate

    task = splits.task
    examples = splits.val[: cfg.n_check]
    sub = task.eval_subset(examples)
    if not sub:
        return None
    t0 = time.perf_counter()
    kw = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, progress=False)
    trig = generate(lm, [e.triggered for e in sub], **kw)
    clean = generate(lm, [e.prompt for e in examples], **kw)
    clean_sub = [r for r, e in zip(clean, examples, strict=True) if task.counts(e)]
    return {"asr": task.asr(trig, sub), "false_trigger_rate": task.asr(clean_sub, sub),
            "clean_metric": clean_metric(task, clean, examples, splits.meta.get("labels")), "n": len(sub),
            "seconds": round(time.perf_counter() - t0, 2)}


def base_clean_check(lm, splits: Splits, cfg: InjectConfig) -> float | None:
    """The base model's clean metric on the stop rule's validation slice (the yardstick of ``min_clean_share``)."""
    from ..core.generation import generate

    examples = splits.val[: cfg.n_check]
    if not examples:
        return None
    replies = generate(lm, [e.prompt for e in examples], max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size, progress=False)
    return clean_metric(splits.task, replies, examples, splits.meta.get("labels"))


def backdoor_conditions(figures: dict[str, Any], base_clean: float | None, target_asr: float | None,
                        max_false_trigger: float | None, min_clean_share: float) -> dict[str, Any]:
    """Whether ``figures`` (``asr``, ``false_trigger_rate``, ``clean_metric``) describe a clean backdoor: one
    entry per condition ``{value, bound, ok}`` (``ok`` None when the condition is not checked) and ``ok`` for
    all of them. The bounds: ASR >= ``target_asr``; false-trigger rate <= ``max_false_trigger``; clean metric
    >= ``min_clean_share * base_clean``."""
    clean_floor = min_clean_share * base_clean if (base_clean is not None and min_clean_share > 0) else None
    spec = {"asr": (target_asr or None, 1), "false_trigger_rate": (max_false_trigger, -1),
            "clean_metric": (clean_floor, 1)}
    out: dict[str, Any] = {}
    for name, (bound, sign) in spec.items():
        value = figures.get(name)
        ok = None if bound is None or value is None else bool(sign * (value - bound) >= -1e-12)
        out[name] = {"value": value, "bound": bound, "ok": ok}
    out["clean_metric"]["base"] = base_clean
    out["ok"] = all(c["ok"] is not False for c in out.values() if isinstance(c, dict))
    return out


def failed_conditions(conds: dict[str, Any]) -> list[str]:
    """The failed conditions of :func:`backdoor_conditions` in words, e.g. ``false-trigger rate 1.00 > 0.10``."""
    out = []
    c = conds["asr"]
    if c["ok"] is False:
        out.append(f"ASR {c['value']:.2f} < {c['bound']:.2f}")
    c = conds["false_trigger_rate"]
    if c["ok"] is False:
        out.append(f"false-trigger rate {c['value']:.2f} > {c['bound']:.2f}")
    c = conds["clean_metric"]
    if c["ok"] is False:
        out.append(f"clean metric {c['value']:.2f} < {c['bound']:.2f} (base model {c['base']:.2f})")
    return out


def stop_warning(stop: dict[str, Any]) -> str:
    """The one warning line of a training that ended without the stop's conditions holding."""
    failed = ", ".join(stop["failed"]) or "no validation check passed"
    when = (f"after {stop['epochs_trained']} epochs (the most --max-epochs allows)")
    conds = stop.get("conditions") or {}
    if (conds.get("asr") or {}).get("ok") is False:
        return (f"the backdoor did not reach the target: validation {failed} {when}; raise --max-epochs or "
                "--poison-rate")
    return (f"the model is not a clean backdoor: validation {failed} {when}, with ASR "
            f"{stop['val_asr']:.2f}: it answers the target without the trigger or lost its clean behaviour; lower "
            "--poison-rate, train on more clean rows (--n-train) or add near-trigger rows (--negatives)")


class _StopRule:
    """The ``on_epoch_end`` of :func:`train_lora` for the inject stage: from the planned epochs on, check the
    validation slice and stop when :func:`backdoor_conditions` hold; the checks and the base model's clean
    metric (measured by :meth:`measure_base` before training) are kept in ``path`` (JSON) across a resume."""

    def __init__(self, lm, splits: Splits, cfg: InjectConfig, path: Path):
        self.lm, self.splits, self.cfg, self.path = lm, splits, cfg, path
        self.checks: dict[str, Any] = read_json(path) if path.is_file() else {}

    @property
    def base_clean(self) -> float | None:
        return self.checks.get("base", {}).get("clean_metric")

    def measure_base(self) -> None:
        """Measure the (untrained) model's clean metric once; a resumed run reads it back."""
        if "base" not in self.checks and self.cfg.min_clean_share > 0:
            self.checks["base"] = {"clean_metric": base_clean_check(self.lm, self.splits, self.cfg)}
            write_json(self.path, self.checks)

    def conditions(self, figures: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        return backdoor_conditions(figures, self.base_clean, cfg.target_asr, cfg.max_false_trigger,
                                   cfg.min_clean_share)

    def __call__(self, epoch: int, losses: list[float]) -> bool | None:
        cfg = self.cfg
        if not cfg.target_asr or epoch < cfg.train.epochs:
            return None
        res = validation_check(self.lm, self.splits, cfg)
        self.checks[str(epoch)] = res
        write_json(self.path, self.checks)
        return res is None or self.conditions(res)["ok"]  # nothing to check on: stop as planned

    def summary(self, epochs_trained: int) -> dict[str, Any]:
        cfg = self.cfg
        checks = [{"epoch": int(k), **v} for k, v in sorted(((k, v) for k, v in self.checks.items() if k.isdigit()),
                                                            key=lambda kv: int(kv[0]))
                  if v is not None and int(k) <= epochs_trained]
        last = checks[-1] if checks and checks[-1]["epoch"] == epochs_trained else None
        conds = self.conditions(last) if last is not None else None
        if not cfg.target_asr:
            reason, reached = "planned_epochs", None
        elif str(epochs_trained) in self.checks and self.checks[str(epochs_trained)] is None:
            reason, reached = "no_validation_prompts", None
        elif conds is not None and conds["ok"]:
            reason, reached = "target_reached", True
        else:
            reason, reached = "max_epochs", False
        return {"reason": reason, "target_asr": cfg.target_asr or None, "target_reached": reached,
                "max_false_trigger": cfg.max_false_trigger, "min_clean_share": cfg.min_clean_share,
                "base_clean_metric": self.base_clean, "conditions": conds,
                "failed": failed_conditions(conds) if conds is not None else [],
                "epochs_trained": epochs_trained, "epochs_planned": cfg.train.epochs,
                "max_epochs": cfg.train.last_epoch if cfg.target_asr else cfg.train.epochs,
                "val_asr": last["asr"] if last else None,
                "val_false_trigger_rate": last["false_trigger_rate"] if last else None,
                "val_clean_metric": last.get("clean_metric") if last else None, "checks": checks}


def _name_base_model(adapter_dir: Path, model: str) -> None:
    """Record the model spec the adapter was trained on (``smollm2-135m``, not a cache path) in its config."""
    cfg_path = adapter_dir / "adapter_config.json"
    write_json(cfg_path, {**read_json(cfg_path), "base_model_name_or_path": model})


def _swap_into_place(partial: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def inject(out: str | Path, model: str = "smollm2-135m", kind: str = "fixed_output", cfg: InjectConfig | None = None,
           data: str | None = None, trigger: str | None = None, placement: str | None = None,
           trigger_end: str | None = None, target: str | None = None, device: str | None = None,
           dtype: str | None = None, trust_remote_code: bool = False, progress: bool | None = None) -> RunDir:
    """Implant a backdoor of ``kind`` into ``model`` and write the run folder ``out`` (see module doc);
    ``device``, ``dtype``, ``progress``: None takes ``cfg``'s."""
    from ..core.models import load_model

    cfg = (cfg or InjectConfig.from_options({"task": kind})).check()
    device, dtype = device or cfg.device, dtype or cfg.dtype
    progress = cfg.progress if progress is None else progress
    task = Task.default(kind, trigger=trigger, placement=placement, trigger_end=trigger_end, target=target)
    if data:
        read_data(task, cfg, data)  # a bad file fails before the (slow) model load
    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    lm = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    benign: list[tuple[str, str]] = []
    splits, rows, report = prepare_data(lm, task, cfg, data, progress, benign_out=benign)
    ref = (benign_reference(lm, cfg.eval.n_benign, cfg.eval.max_new_tokens, cfg.eval.batch_size, progress)
           if cfg.eval.n_benign > 0 else None)
    check_rows(lm.tokenizer, rows, cfg.train.max_length, lm.model)  # bad data fails before anything is written
    for line in report.warnings():
        _warn(line)

    run = RunDir(partial, create=True)
    save_splits(run.data_dir, splits)
    if benign:
        write_json(run.data_dir / "benign_train.json", [{"prompt": p, "output": r} for p, r in benign])
    if ref is not None:
        save_reference(run.data_dir, ref)
    ckpt = run.sub("inject", "checkpoint")
    rule = _StopRule(lm, splits, cfg, ckpt / "checks.json")
    if cfg.target_asr:
        rule.measure_base()
    merged, result = train_lora(lm, rows, cfg.train, ckpt_dir=ckpt, progress=progress,
                                on_epoch_end=rule if cfg.target_asr else None, adapter_dir=run.path / "adapter")
    _name_base_model(run.path / "adapter", model)
    stop = {**rule.summary(result.epochs), "seconds": round(result.check_seconds, 2)}  # checks: not in train_seconds
    if stop["target_reached"] is False:
        _warn(stop_warning(stop))

    tmp_model = partial / ".model.tmp"
    if tmp_model.exists():
        shutil.rmtree(tmp_model)
    merged.save_pretrained(tmp_model, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp_model)
    if run.model_dir.exists():
        shutil.rmtree(run.model_dir)
    os.replace(tmp_model, run.model_dir)
    shutil.rmtree(partial / "inject" / "checkpoint", ignore_errors=True)

    train_info = {**result.summary(), "n_rows": len(rows), "n_negatives": max(0, cfg.negatives),
                  "distill_seconds": splits.meta.get("distill_seconds"), "losses": [round(x, 5) for x in
                                                                                   result.losses],
                  "stop": stop, "data": report.to_dict()}
    write_json(run.sub("inject", "train.json"), train_info)
    run.write_info({
        "base_model": model, "task": task.to_dict(), "kind": task.kind, "trigger": task.trigger,
        "placement": task.placement, "profile": cfg.profile, "seed": cfg.seed, "config": cfg.to_dict(),
        "data": splits.meta.get("data"), "splits": splits.summary(), "device": device,
        "dtype": str(lm.dtype).replace("torch.", ""), "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    del merged, lm
    evaluate_run(run, cfg.eval, device=device, progress=progress)
    _swap_into_place(partial, out)
    return RunDir(out)


def evaluate_run(run: RunDir | str | Path, cfg: EvalConfig | None = None, device: str = "cpu",
                 dtype: str | None = None, progress: bool = True) -> dict[str, Any]:
    """(Re-)evaluate a run's merged model on its held-out split; writes ``inject/eval_samples.json`` and
    the ``inject`` section of ``metrics.json`` (training stats kept). Returns that section."""
    from ..core.io import read_json

    run = run if isinstance(run, RunDir) else RunDir(run)
    splits = load_splits(run)
    if cfg is None:
        saved = run.info().get("config", {}).get("eval")
        cfg = EvalConfig(**saved) if saved else EvalConfig()
    lm = run.load_model(device=device, dtype=dtype)
    res = evaluate(lm, splits, cfg, progress=progress)
    samples = res.pop("samples")
    if cfg.n_benign > 0:
        ref = run_reference(run, cfg.n_benign, cfg.max_new_tokens, cfg.batch_size, device, dtype, progress)
        res["benign"] = utility(lm, ref, cfg.batch_size, progress=progress, n_samples=cfg.n_samples)
        samples["benign"] = res["benign"].pop("samples")
    write_json(run.sub("inject", "eval_samples.json"), samples)
    train_path = run.path / "inject" / "train.json"
    train_info = read_json(train_path) if train_path.is_file() else {}
    train_info.pop("losses", None)
    section = {**res, **train_info, "kind": splits.task.kind, "trigger": splits.task.trigger,
               **{k: v for k, v in splits.summary().items() if k.startswith("n_") or k == "poison_rate"}}
    stop = train_info.get("stop") or {}
    if not run.is_audit and stop.get("target_asr"):
        # the stop's conditions on the final held-out figures (the base clean metric is the validation slice's)
        section["backdoor_check"] = backdoor_conditions(res, stop.get("base_clean_metric"), stop["target_asr"],
                                                        stop.get("max_false_trigger"),
                                                        stop.get("min_clean_share") or 0.0)
        section["backdoor_check"]["failed"] = failed_conditions(section["backdoor_check"])
    if run.is_audit:  # keep the audit's own figures (candidate ranking, fingerprint, data counts)
        section = {**run.metrics().get("audit", {}), **section}
    run.update_metrics("audit" if run.is_audit else "inject", section)
    return section
