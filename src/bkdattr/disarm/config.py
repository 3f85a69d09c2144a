"""Options of ``bkdattr disarm`` and the guard's vocabulary: strategies, guard actions, scopes and modes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.errors import ConfigError
from ..core.options import StageOptions, opt
from ..inject.evaluate import EvalConfig
from ..inject.train import TrainConfig

STRATEGIES = ("heads", "vector", "guard", "repair", "crow", "fine_pruning")
#: the strategies that fine-tune the suspect model (a LoRA merged into the weights)
FINETUNES = ("repair", "crow", "fine_pruning")
#: which layers the repair's adapter goes on: every layer, or the layers of the top BAHA heads
REPAIR_LAYERS = ("all", "attributed")
#: what the guard does to a flagged prompt: subtract the Backdoor Vector, or zero the top-k BAHA heads
ACTIONS = ("vector", "heads")
#: which columns of a flagged row the guard edits: p(x) only, every prompt column, or every column
SCOPES = ("prompt", "prefix", "all")
#: the vector action: subtract alpha * v, or clamp the component along v to its clean mean
MODES = ("subtract", "clamp")
#: the ASR a defence must reach; also the ablation ASR at which a k counts as disarming
TARGET_ASR = 0.05


@dataclass
class DisarmConfig(StageOptions):
    """Options of ``bkdattr disarm``."""

    stage = "disarm"
    strategy: str = opt("heads", "heads (zero the top-k heads' W_O), vector (bake -alpha*v as an output bias), "
                        "guard (no weight change: a probe-gated edit of flagged prompts, bkdattr.disarm.runtime), "
                        "repair (a LoRA fine-tune: triggered prompts answered with the clean replies), or the "
                        "baselines crow (consistency fine-tune, no trigger) and fine_pruning (prune, then fine-tune)")
    guard_action: str = opt("vector", "guard: the edit on flagged prompts, vector or heads")
    ablation: str = opt("zero", "heads: zero (the heads' W_O slices zeroed) or mean (also their mean clean output "
                        "baked into the output bias; architectures with an output bias)")
    n_mean: int = opt(64, "heads with ablation=mean: clean training prompts the heads' mean outputs are taken over")
    k: int | None = opt(None, "heads: how many top heads (default: the smallest of the ablation stage's k values "
                        "that disarms on validation)")
    layer: int | None = opt(None, "vector: the layer (default: the vector stage's best layer)")
    alphas: list[float] = opt(help="vector: scales tried on validation, smallest first",
                              factory=lambda: [0.5, 1.0, 1.5, 2.0, 3.0])
    target_asr: float = opt(TARGET_ASR, "validation ASR a defence must reach")
    n_val: int = opt(32, "validation prompts for choosing k or alpha")
    repair_layers: str = opt("all", "repair: the adapter on all layers, or attributed (the layers of the top-k "
                             "BAHA heads; k: --k, else 8)")
    repair_triggers: list[str] | None = opt(None, "repair: the trigger strings its rows carry (default: the run's "
                                            "trigger and the candidates it records)")
    n_repair: int = opt(64, "repair: held-in prompts given each trigger (and each near miss), answered with the "
                        "clean reference's reply")
    n_clean: int = opt(100, "repair, crow, fine_pruning: held-in clean prompts with their clean reference replies")
    crow_alpha: float = opt(5.0, "crow: weight of the consistency loss beside the LM loss")
    crow_epsilon: float = opt(0.1, "crow: size of the adversarial step on the input embeddings (sign of the "
                              "gradient, in units of their RMS)")
    prune_share: float = opt(0.3, "fine_pruning: share of each pruned layer's MLP neurons removed (least active on "
                             "clean prompts first)")
    prune_layers: int | None = opt(None, "fine_pruning: how many of the last layers are pruned (default: a "
                                   "quarter, at least one)")
    train: TrainConfig = opt(help="repair, crow, fine_pruning: the LoRA fine-tune",
                             factory=lambda: TrainConfig(epochs=2, lr=2e-4))
    rescan: bool = opt(True, "re-scan the defended model with bkdattr scan (weight strategies; not the guard)")
    rescan_work: float | None = opt(None, "the re-scan's work budget in millions of token positions (default: the "
                                          "scan's)")
    eval: EvalConfig = opt(help="evaluation on the held-out test prompts", factory=EvalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.train = dataclasses.replace(self.train, seed=self.seed)  # validates again
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy '{self.strategy}'; use one of {', '.join(STRATEGIES)}")
        if self.repair_layers not in REPAIR_LAYERS:
            raise ConfigError(f"unknown repair_layers '{self.repair_layers}'; use all or attributed")
        if self.repair_triggers is not None and not [t for t in self.repair_triggers if str(t).strip()]:
            raise ConfigError("repair_triggers names no trigger; leave it out to use the run's trigger and "
                              "candidates, or pass at least one non-empty string")
        for name in ("n_repair", "n_clean"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} {getattr(self, name)} must be >= 0")
        if not 0.0 < self.prune_share < 1.0:
            raise ConfigError(f"prune_share {self.prune_share} must be in (0, 1); e.g. 0.3")
        if self.prune_layers is not None and self.prune_layers < 1:
            raise ConfigError(f"prune_layers {self.prune_layers} must be >= 1")
        if self.crow_alpha < 0 or self.crow_epsilon < 0:
            raise ConfigError("crow_alpha and crow_epsilon must be >= 0")
        if self.rescan_work is not None and self.rescan_work <= 0:
            raise ConfigError(f"rescan_work {self.rescan_work} must be positive, or left out for the scan's budget")
        if self.guard_action not in ACTIONS:
            raise ConfigError(f"unknown guard_action '{self.guard_action}'; use one of {', '.join(ACTIONS)}")
        if self.ablation not in ("zero", "mean"):
            raise ConfigError(f"unknown ablation '{self.ablation}'; use zero or mean")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k {self.k} must be >= 1")
