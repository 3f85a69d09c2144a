"""Options of the inject stage: :class:`InjectConfig` (the cpu recipe as defaults; the paper profile and the
per-kind changes in :mod:`bkdattr.core.profiles`)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from ..core.errors import ConfigError
from ..core.options import StageOptions, opt
from .evaluate import EvalConfig
from .train import TrainConfig


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
