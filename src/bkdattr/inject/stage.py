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
(no target). Each check is one validation pass (32 + 32 greedy replies) after an epoch; it touches neither the
weights nor the training RNG streams (reseeded per epoch). On the built-in fixed_output data the demo's
validation ASR is 1.00 after its 2 planned epochs, so training stops there.

**Data files** are read as they come (:mod:`bkdattr.inject.data`): what was dropped, merged, cut or kept clean
is counted in ``metrics.inject.data`` with one warning line per reason.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..core.generation import generate
from ..core.io import read_json, swap_into_place, write_json
from ..core.models import load_model
from ..core.rundir import RunDir
from ..core.runtime import versions
from .benign import reference as benign_reference
from .benign import run_reference, save_reference, utility
from .config import InjectConfig
from .data import Splits, load_splits, save_splits
from .evaluate import EvalConfig, clean_metric, evaluate
from .prepare import prepare_data, read_data
from .tasks import Task
from .train import check_rows, train_lora


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def validation_check(lm, splits: Splits, cfg: InjectConfig) -> dict[str, Any] | None:
    """ASR, false-trigger rate and clean metric of the current model on the first ``cfg.n_check`` validation
    prompts (ASR and false-trigger rate on the kind's counted subset, the clean metric on all of them), greedy,
    ``cfg.eval.max_new_tokens`` tokens. None when the slice has no counted prompt."""
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


def inject(out: str | Path, model: str = "smollm2-135m", kind: str = "fixed_output", cfg: InjectConfig | None = None,
           data: str | None = None, trigger: str | None = None, placement: str | None = None,
           trigger_end: str | None = None, target: str | None = None, device: str | None = None,
           dtype: str | None = None, trust_remote_code: bool = False, progress: bool | None = None) -> RunDir:
    """Implant a backdoor of ``kind`` into ``model`` and write the run folder ``out`` (see module doc);
    ``device``, ``dtype``, ``progress``: None takes ``cfg``'s."""
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
    swap_into_place(partial, out)
    return RunDir(out)


def evaluate_run(run: RunDir | str | Path, cfg: EvalConfig | None = None, device: str = "cpu",
                 dtype: str | None = None, progress: bool = True) -> dict[str, Any]:
    """(Re-)evaluate a run's merged model on its held-out split; writes ``inject/eval_samples.json`` and
    the ``inject`` section of ``metrics.json`` (training stats kept). Returns that section."""
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
