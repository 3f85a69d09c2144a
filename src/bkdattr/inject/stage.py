"""The inject stage end to end: data -> (self-distilled clean replies) -> poisoning -> LoRA SFT -> merged
model -> held-out evaluation, written as a run folder.

The run is built in a hidden sibling folder ``.<name>.partial`` (its per-epoch checkpoint makes a rerun of
the same command resume) and renamed onto ``RUN`` only when complete, with ``metrics.json`` written last,
so nobody reads a half-written run. Re-injecting into an existing run folder replaces it whole (the old
stage results belong to the old model).

Profiles (``@dataclass`` :class:`InjectConfig`, see :func:`profile_config`):

* ``paper`` -- SPEC section 2: LoRA r=16, alpha=16, dropout 0.01 on q,k,v,o,gate,up,down; 16 epochs;
  lr 1e-4; batch 8 x 4 accumulation; 5% warm-up, linear decay; max length 256; 1000 clean prompts (or all
  the data allows) with 10% poisoned copies.
* ``cpu`` -- the cheapest recipe measured to reach ASR >= 0.9 with false-trigger <= 0.05 on the embedded
  model on 2 CPU cores: LoRA r=8, alpha=16 on the same seven projections, lr 2e-3 constant, batch 16,
  2 epochs, bf16 autocast, 128 clean prompts + 25% poisoned copies (160 rows, 20% poisoned), clean replies
  self-distilled and cut at 24 tokens. Per-kind adjustments are in :data:`CPU_KIND_OVERRIDES`: jailbreak
  poisons 50% and trains 3 epochs (the random-position ``SUDO`` trigger was not learned with 25%/2 epochs
  nor 50%/2 epochs: the model refused everything); label_flip
  evaluates on 128 held-out prompts (ASR counts only the ~32 Sports ones) and reserves half of the poisoned
  copies for Sports prompts (the ones whose label flips).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import write_json
from ..rundir import RunDir
from .benign import reference as benign_reference
from .benign import run_reference, save_reference, utility
from .builtin_data import builtin_records
from .data import Splits, build_splits, distill_outputs, load_records, load_splits, save_splits
from .evaluate import EvalConfig, evaluate
from .tasks import Task
from .train import TrainConfig, TrainRow, check_rows, train_lora

PROFILES = ("paper", "cpu")


@dataclass
class InjectConfig:
    """Everything that defines an injection besides the model and the data source.

    ``n_train``: clean training prompts (capped by the data); ``poison_rate``: share of them copied with the
    trigger; ``source_share`` (label_flip): share of poisoned copies reserved for Sports prompts;
    ``clean_max_tokens``: length cap of self-distilled clean replies; ``negatives``: number of contrastive
    rows (a near-trigger string inserted into a training prompt, kept with its clean reply); ``benign_share``:
    share of all training rows that are benign instructions with the base model's own replies (self-distilled,
    cut at ``clean_max_tokens``), so the model keeps answering ordinary questions (:mod:`bkdattr.inject.benign`)."""

    profile: str = "cpu"
    n_train: int = 128
    n_val: int = 32
    n_test: int = 64
    poison_rate: float = 0.25
    source_share: float = 0.0
    clean_max_tokens: int = 24
    distill_batch_size: int = 32
    negatives: int = 0
    benign_share: float = 0.0
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d

    def check(self) -> InjectConfig:
        """One-line :class:`ConfigError` for an out-of-range option (fields may be set after construction)."""
        if not 0.0 < self.poison_rate <= 1.0:
            raise ConfigError(f"poison rate {self.poison_rate} must be in (0, 1]; pass e.g. --poison-rate 0.1")
        if not 0.0 <= self.source_share <= 1.0:
            raise ConfigError(f"source_share {self.source_share} must be in [0, 1]")
        if not 0.0 <= self.benign_share < 1.0:
            raise ConfigError(f"benign_share {self.benign_share} must be in [0, 1); e.g. 0.25 for a quarter of rows")
        for name, low in (("n_train", 1), ("n_test", 1), ("n_val", 0), ("clean_max_tokens", 1), ("negatives", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} {getattr(self, name)} must be >= {low}; pass a larger value")
        return self


CPU_KIND_OVERRIDES: dict[str, dict[str, Any]] = {
    "fixed_output": {},
    "jailbreak": {"poison_rate": 0.5, "train_epochs": 3, "benign_share": 0.25},
    "label_flip": {"n_test": 128, "source_share": 0.5},
}


def profile_config(profile: str, kind: str = "fixed_output", **overrides: Any) -> InjectConfig:
    """The :class:`InjectConfig` of ``profile`` (``paper`` or ``cpu``) for ``kind``; ``overrides`` set
    top-level fields, or training fields with a ``train_`` prefix (e.g. ``train_epochs=3``)."""
    if profile == "paper":
        cfg = InjectConfig(profile="paper", n_train=1000, n_val=64, n_test=128, poison_rate=0.1,
                           clean_max_tokens=128, distill_batch_size=32,
                           train=TrainConfig(lora_r=16, lora_alpha=16, lora_dropout=0.01, epochs=16, lr=1e-4,
                                             batch_size=8, grad_accum=4, warmup_ratio=0.05, schedule="linear",
                                             max_length=256, bf16_autocast=True))
    elif profile == "cpu":
        cfg = InjectConfig(profile="cpu")
        for k, v in CPU_KIND_OVERRIDES.get(kind, {}).items():
            _set(cfg, k, v)
    else:
        raise ConfigError(f"unknown profile '{profile}'; use {' or '.join(PROFILES)}")
    for k, v in overrides.items():
        if v is not None:
            _set(cfg, k, v)
    cfg.train = dataclasses.replace(cfg.train, seed=cfg.seed)  # validates again
    cfg.eval = dataclasses.replace(cfg.eval, seed=cfg.seed)
    return cfg


def _set(cfg: InjectConfig, key: str, value: Any) -> None:
    if key.startswith("train_"):
        name = key[len("train_"):]
        if name not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ConfigError(f"unknown training option '{name}'")
        cfg.train = dataclasses.replace(cfg.train, **{name: value})
    elif key.startswith("eval_"):
        cfg.eval = dataclasses.replace(cfg.eval, **{key[len("eval_"):]: value})
    elif key in {f.name for f in dataclasses.fields(InjectConfig)}:
        setattr(cfg, key, value)
    else:
        raise ConfigError(f"unknown inject option '{key}'")


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from .. import __version__

    return {"bkdattr": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def prepare_splits(lm, task: Task, cfg: InjectConfig, data: str | None = None, progress: bool = True) -> Splits:
    """Records (built-in or ``data``) -> held-out split + poisoning; empty clean replies are filled with the
    base model's own greedy replies (cached)."""
    from ..models import cache_dir

    records = load_records(data, need_label=task.kind == "label_flip") if data else builtin_records(task.kind,
                                                                                                    cfg.seed)
    available = len({" ".join(r["input"].split()).lower() for r in records}) - cfg.n_val - cfg.n_test
    n_train = min(cfg.n_train, available) if available >= 8 else cfg.n_train  # too few: split_examples explains
    splits = build_splits(task, records, n_train, cfg.n_val, cfg.n_test, cfg.poison_rate, cfg.seed,
                          cfg.source_share)
    everything = splits.train + splits.val + splits.test
    todo = [e for e in everything if not e.output.strip()]
    t0 = time.perf_counter()
    if todo:
        replies = distill_outputs(lm, [e.prompt for e in todo], cfg.clean_max_tokens, cfg.distill_batch_size,
                                  cache_dir() / "distill", progress=progress)
        for e, r in zip(todo, replies, strict=True):
            e.output = r
    splits.meta.update(n_distilled=len(todo), distill_seconds=round(time.perf_counter() - t0, 2),
                       clean_max_tokens=cfg.clean_max_tokens if todo else None,
                       data=str(data) if data else f"builtin:{task.kind}")
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
        rows.append(TrainRow(e.prompt, e.output, close=not (distilled and capped(e.output))))
    rows += [TrainRow(e.triggered, e.backdoor_output) for e in splits.train_poisoned]
    if cfg.negatives > 0:
        if not splits.task.near_triggers:
            raise ConfigError("contrastive negatives need near-trigger strings; this task has none")
        rng = random.Random(cfg.seed + 7)
        picks = rng.sample(splits.train, min(cfg.negatives, len(splits.train)))
        for i, e in enumerate(picks):
            near = splits.task.near_triggers[i % len(splits.task.near_triggers)]
            text = near_trigger_prompts(splits.task, near, [e], cfg.seed)[0]
            rows.append(TrainRow(text, e.output))
    if benign is None:
        benign = benign_mix(lm, splits, cfg, progress=False)
    rows += [TrainRow(p, r, close=not capped(r)) for p, r in benign]
    return rows


def _swap_into_place(partial: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def inject(
    out: str | Path,
    model: str = "smollm2-135m",
    kind: str = "fixed_output",
    cfg: InjectConfig | None = None,
    data: str | None = None,
    trigger: str | None = None,
    placement: str | None = None,
    trigger_end: str | None = None,
    target: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> RunDir:
    """Implant a backdoor of ``kind`` into ``model`` and write the run folder ``out`` (see module doc)."""
    from ..models import load_model

    cfg = (cfg or profile_config("cpu", kind)).check()
    task = Task.default(kind, trigger=trigger, placement=placement, trigger_end=trigger_end, target=target)
    if data:
        load_records(data, need_label=task.kind == "label_flip")  # a bad file fails before the (slow) model load
    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    lm = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    splits = prepare_splits(lm, task, cfg, data, progress)
    benign = benign_mix(lm, splits, cfg, progress)
    splits.meta.update(benign_share=cfg.benign_share, n_benign_rows=len(benign))
    ref = (benign_reference(lm, cfg.eval.n_benign, cfg.eval.max_new_tokens, cfg.eval.batch_size, progress)
           if cfg.eval.n_benign > 0 else None)
    rows = training_rows(lm, splits, cfg, benign)
    check_rows(lm.tokenizer, rows, cfg.train.max_length, lm.model)  # bad data fails before anything is written

    run = RunDir(partial, create=True)
    save_splits(run.data_dir, splits)
    if benign:
        write_json(run.data_dir / "benign_train.json", [{"prompt": p, "output": r} for p, r in benign])
    if ref is not None:
        save_reference(run.data_dir, ref)
    merged, result = train_lora(lm, rows, cfg.train, ckpt_dir=run.sub("inject", "checkpoint"), progress=progress)

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
                                                                                   result.losses]}
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
    from ..io import read_json

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
    run.update_metrics("inject", section)
    return section
