"""Options of ``bkdattr disarm`` and the guard's vocabulary: strategies, guard actions, scopes and modes."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ConfigError
from ..core.options import StageOptions, opt
from ..inject.evaluate import EvalConfig

STRATEGIES = ("heads", "vector", "guard")
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
    strategy: str = opt("heads", "heads (zero the top-k heads' W_O), vector (bake -alpha*v as an output bias) or "
                        "guard (no weight change: a probe-gated edit of flagged prompts, bkdattr.disarm.runtime)")
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
    eval: EvalConfig = opt(help="evaluation on the held-out test prompts", factory=EvalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy '{self.strategy}'; use heads, vector or guard")
        if self.guard_action not in ACTIONS:
            raise ConfigError(f"unknown guard_action '{self.guard_action}'; use one of {', '.join(ACTIONS)}")
        if self.ablation not in ("zero", "mean"):
            raise ConfigError(f"unknown ablation '{self.ablation}'; use zero or mean")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k {self.k} must be >= 1")
