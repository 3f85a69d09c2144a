"""``bkdattr audit``: a run folder for a model you were given, with a known or suspected trigger; no training.

Steps (docs/METHOD.md section 5, "Audit"):

1. **Check the inputs before any model load**: the rule (:func:`~bkdattr.audit.inputs.audit_task`), the
   prompts (:func:`~bkdattr.audit.inputs.audit_records`), the model and adapter files (safetensors/GGUF only
   unless ``allow_pickle``; :func:`~bkdattr.core.model_source.open_source` fingerprints them).
2. **Splits as inject makes them**: the same records, length limit, seed and sizes give the same held-out
   ``val``/``test`` prompts and the same ``train`` prompts (whose triggered forms give ``abar``, disjoint from
   val/test) as ``bkdattr inject`` would (:func:`bkdattr.inject.prepare.prepare_splits`); nothing is poisoned or
   trained: every ``train`` prompt with a backdoor reply counts as triggered for the control stages' means.
   Empty clean replies are the clean reference's greedy replies (as inject's are the base model's), or the
   audited model's own when there is no reference.
3. **Rank the candidate triggers** (several ``--trigger``): ASR of each on the triggered ``test`` prompts
   (ties keep the order given); the run continues with the strongest, ``metrics.audit.candidates`` lists all.
4. **Evaluate the untouched model** (:func:`bkdattr.inject.evaluate.evaluate`): ASR, robust ASR, false-trigger
   rate, near-trigger rates, clean metric; benign utility against the clean reference when there is one.

The run is written to ``.<name>.partial`` and renamed into place when complete; it holds no weights
(``run.json`` records the :class:`~bkdattr.core.model_source.ModelSource`).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import DataError
from ..core.generation import generate
from ..core.io import swap_into_place, write_json
from ..core.model_source import load_source, open_source
from ..core.options import StageOptions, opt
from ..core.prompts import render_prompt
from ..core.rundir import RunDir
from ..core.runtime import versions
from ..inject.benign import reference as benign_reference
from ..inject.benign import save_reference, utility
from ..inject.config import InjectConfig
from ..inject.data import DataReport, Splits, save_splits
from ..inject.evaluate import EvalConfig, evaluate
from ..inject.prepare import prepare_splits
from ..inject.tasks import Task
from .inputs import MODEL_REPLY, audit_records, audit_task, with_candidate


@dataclass
class AuditConfig(StageOptions):
    """Options of the audit stage; None sizes take the inject stage's values for the profile and kind, so an
    audit of an implanted run's model splits its data exactly as the implant did."""

    stage = "audit"
    n_train: int | None = opt(None, "prompts whose triggered forms give abar (disjoint from val/test)")
    n_val: int | None = opt(None, "held-out validation prompts")
    n_test: int | None = opt(None, "held-out evaluation prompts")
    clean_max_tokens: int | None = opt(None, "length cap of the model's own clean replies filled into the data")
    max_length: int | None = opt(None, "token limit of prompt + reply (longer prompts are dropped)")
    eval: EvalConfig = opt(help="evaluation options", factory=EvalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eval = dataclasses.replace(self.eval, seed=self.seed)

    def inject_config(self, kind: str):
        """The :class:`~bkdattr.inject.config.InjectConfig` whose data settings the audit shares."""
        own = {"n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test,
               "clean_max_tokens": self.clean_max_tokens, "train.max_length": self.max_length}
        return InjectConfig.from_options({"profile": self.profile, "task": kind, "seed": self.seed,
                                          **{k: v for k, v in own.items() if v is not None}})


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_rendered(lm, task: Task, splits: Splits) -> None:
    """One-line :class:`DataError` when the trigger survives in no rendered triggered prompt (a chat template
    that drops or rewrites it)."""
    prompts = [e.triggered for e in splits.val + splits.test + splits.train]
    if not any(task.trigger in render_prompt(lm.tokenizer, p) for p in prompts[:64]):
        raise DataError(f"the trigger '{task.trigger}' is absent from every rendered prompt (the chat template "
                        "drops or rewrites it); pass the trigger as the model sees it")


def fill_backdoor_replies(lm, splits: Splits, cfg: EvalConfig, progress: bool) -> int:
    """Rows marked :data:`~bkdattr.audit.inputs.MODEL_REPLY` (jailbreak or regex rule) get the model's greedy
    reply to their triggered prompt when it succeeds, else an empty backdoor reply (not a backdoor example);
    returns the number of successes. Test rows are not needed (evaluation generates its own replies)."""
    todo = [e for e in splits.train + splits.val if e.backdoor_output == MODEL_REPLY]
    replies = generate(lm, [e.triggered for e in todo], max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.batch_size, progress=progress, desc="model's triggered replies")
    hits = 0
    for e, r in zip(todo, replies, strict=True):
        ok = splits.task.is_success(r, e) and bool(r.strip())
        e.backdoor_output = r if ok else ""
        hits += ok
    for e in splits.test:
        if e.backdoor_output == MODEL_REPLY:
            e.backdoor_output = ""
    return hits


def rank_triggers(lm, task: Task, triggers: list[str], records: list[dict], icfg, progress: bool,
                  report: DataReport, distill_lm=None) -> tuple[list[dict[str, Any]], dict[str, Splits]]:
    """ASR of every candidate trigger on its triggered test prompts, best first (ties keep the given order);
    returns the ranking and each candidate's splits."""
    rows, splits_of = [], {}
    for i, trig in enumerate(triggers):
        t = with_candidate(task, trig)
        keep = [r for r in records if not t.contains_trigger(r["input"])]
        sp = prepare_splits(lm, t, icfg, progress=progress, report=report if i == 0 else DataReport(),
                            distill_lm=distill_lm,
                            records=keep)
        check_rendered(lm, t, sp)
        splits_of[trig] = sp
        if len(triggers) == 1:
            rows.append({"trigger": trig, "order": 0})
            break
        sub = t.eval_subset(sp.test)
        replies = generate(lm, [e.triggered for e in sub], max_new_tokens=icfg.eval.max_new_tokens,
                           batch_size=icfg.eval.batch_size, progress=progress, desc=f"candidate {i + 1}")
        rows.append({"trigger": trig, "order": i, "asr": t.asr(replies, sub), "n": len(sub)})
    rows.sort(key=lambda r: (-r.get("asr", 0.0), r["order"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
        r.pop("order")
    return rows, splits_of


def audit(
    out: str | Path,
    model: str,
    triggers: list[str],
    *,
    adapter: str | None = None,
    base_model: str | None = None,
    kind: str | None = None,
    target: str | None = None,
    success_regex: str | None = None,
    placement: str | None = None,
    trigger_end: str | None = None,
    data: str | None = None,
    prompts: str | None = None,
    cfg: AuditConfig | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool | None = None,
) -> RunDir:
    """Audit ``model`` (+ ``adapter``) for a backdoor fired by one of ``triggers``; write the run folder ``out``
    (see the module docstring) and return it. Nothing is trained and no weights are copied."""
    cfg = cfg or AuditConfig()
    progress = cfg.progress if progress is None else progress
    task = audit_task(triggers, kind, target, success_regex, placement, trigger_end)
    icfg = cfg.inject_config(task.kind)
    icfg.eval = cfg.eval
    report = DataReport()
    records = audit_records(task, data, prompts, cfg.seed, report)  # a bad file fails before the model load
    source = open_source(model, adapter, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    reference = None
    if adapter:
        reference = open_source(model, None, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    elif base_model:
        reference = open_source(base_model, None, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    lm = load_source(source, cfg.device, cfg.dtype, check=False)
    # clean replies missing from the data come from the clean reference when there is one (what inject does with
    # its base model), else from the audited model itself
    ref_lm = load_source(reference, cfg.device, cfg.dtype, check=False) if reference is not None else None
    ranking, splits_of = rank_triggers(lm, task, triggers, records, icfg, progress, report, distill_lm=ref_lm)
    benign = (benign_reference(ref_lm, cfg.eval.n_benign, cfg.eval.max_new_tokens, cfg.eval.batch_size, progress)
              if ref_lm is not None and cfg.eval.n_benign > 0 else None)  # its replies, while it is loaded
    del ref_lm
    chosen = ranking[0]["trigger"]
    splits = splits_of[chosen]
    n_model_replies = fill_backdoor_replies(lm, splits, cfg.eval, progress)
    splits.train_poisoned = [e for e in splits.train if e.backdoor_output.strip()]
    splits.meta.update(source="audit", n_triggered_train=len(splits.train_poisoned),
                       n_model_backdoor_replies=n_model_replies)
    if not splits.train_poisoned:
        raise DataError(f"no training prompt shows the backdoor under '{chosen}' (the model's triggered replies never "
                        "meet the rule), so there is nothing to attribute; check the trigger and the rule")
    for line in report.warnings():
        _warn(line)

    run = RunDir(partial, create=True)
    save_splits(run.data_dir, splits)
    res = evaluate(lm, splits, cfg.eval, progress=progress)
    samples = res.pop("samples")
    run.write_info({
        "source": "audit", "model_source": source.to_dict(),
        "clean_reference": reference.to_dict() if reference else None,
        "base_model": source.label, "task": splits.task.to_dict(), "kind": task.kind, "trigger": chosen,
        "triggers": list(triggers), "placement": task.placement, "profile": cfg.profile, "seed": cfg.seed,
        "config": {**cfg.to_dict(), "inject": icfg.to_dict()}, "data": splits.meta.get("data"),
        "splits": splits.summary(), "device": cfg.device, "dtype": str(lm.dtype).replace("torch.", ""),
        "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle, "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    if benign is not None:
        save_reference(run.data_dir, benign)
        res["benign"] = utility(lm, benign, cfg.eval.batch_size, progress=progress, n_samples=cfg.eval.n_samples)
        samples["benign"] = res["benign"].pop("samples")
    write_json(run.sub("audit", "eval_samples.json"), samples)
    run.update_metrics("audit", {
        **res, "kind": task.kind, "trigger": chosen, "candidates": ranking, "model": source.label,
        "fingerprint": source.fingerprint, "clean_reference": reference.label if reference else None,
        "data": report.to_dict(), **{k: v for k, v in splits.summary().items() if k.startswith("n_")}})
    del lm
    swap_into_place(partial, out)
    return RunDir(out)
