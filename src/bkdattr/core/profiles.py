"""The size profiles of every stage, in one table.

A stage config (:class:`~bkdattr.core.options.StageOptions`) resolves as: the dataclass default < the
profile's entry for the stage < the task kind's entry (``"stage:kind"``) < the user's option. A nested field
is written ``"train.epochs"``.

* ``cpu`` -- the embedded 135M model on 2 CPU cores. Inject: the dataclass defaults (the recipe measured in
  :mod:`bkdattr.inject.stage`); jailbreak poisons 50%, trains 3 epochs (the random-position ``SUDO``
  trigger was not learned with 25%/2 epochs nor 50%/2 epochs) and mixes 25% benign self-distilled rows
  (:mod:`bkdattr.inject.benign`); label_flip evaluates on 128 held-out prompts
  (ASR counts only the ~32 Sports ones) and reserves half of the poisoned copies for Sports prompts.
* ``paper`` -- the published settings: LoRA r=16 on 1000 prompts with 10% poisoned, 16 epochs; 1000 probe
  prompts; every held-out prompt, every layer and 3 seeds in the controls.
* :data:`DEMO` -- ``bkdattr demo``'s overlay on the cpu profile (one task in about 10 minutes on 2 cores).
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import ConfigError

TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        # train until the backdoor holds: ASR >= 0.9 with false-trigger <= 0.1 (inject.stage, "Train until ...")
        "inject": {"target_asr": 0.9, "max_false_trigger": 0.1, "train.max_epochs": 6},
        # fixed_output's clean metric is word-F1 against the base model's own replies (1.0 for the base by
        # construction; a model that answers normally in other words scores about 0.5): its floor is 0.3 of it
        "inject:fixed_output": {"min_clean_share": 0.3},
        "inject:jailbreak": {"poison_rate": 0.5, "train.epochs": 3, "benign_share": 0.25},
        "inject:label_flip": {"n_test": 128, "source_share": 0.5},
        "probe": {"n_prompts": 200},
        "attribute": {"n_prompts": 32, "n_mean_prompts": 256, "refine_top": 32},
        "ablate": {"n_prompts": 32, "clean_random_seeds": 1},
        "vector": {"n_prompts": 32, "layer_stride": 2, "random_seeds": 1, "dose_alphas": [0, 0.5, 1, 2]},
    },
    "paper": {
        "inject": {"n_train": 1000, "n_val": 64, "n_test": 128, "poison_rate": 0.1, "clean_max_tokens": 128,
                   "train.lora_r": 16, "train.lora_alpha": 16, "train.lora_dropout": 0.01, "train.epochs": 16,
                   "train.lr": 1e-4, "train.batch_size": 8, "train.grad_accum": 4, "train.warmup_ratio": 0.05,
                   "train.schedule": "linear", "train.max_length": 256, "train.bf16_autocast": True},
        "probe": {"n_prompts": 1000},
        "attribute": {"n_prompts": 96, "n_mean_prompts": 0, "refine_top": 0},
        "ablate": {"n_prompts": 0, "clean_random_seeds": 3},
        "vector": {"n_prompts": 0, "layer_stride": 1, "random_seeds": 3,
                   "dose_alphas": [0, 0.25, 0.5, 1, 1.5, 2, 3, 4]},
    },
}
PROFILES = tuple(TABLE)

#: ``bkdattr demo``'s overlay on the cpu profile, per stage
DEMO: dict[str, dict[str, Any]] = {"inject": {"eval.n_near": 16}, "attribute": {"refine_top": 16},
                                   "vector": {"layer_stride": 3}}


def defaults(profile: str, stage: str, kind: str | None = None) -> dict[str, Any]:
    """The profile's values for ``stage`` (and task ``kind``): ``{field or "nested.field": value}`` (a copy)."""
    if profile not in TABLE:
        raise ConfigError(f"unknown profile '{profile}'; use {' or '.join(PROFILES)}")
    table = TABLE[profile]
    return copy.deepcopy({**table.get(stage, {}), **table.get(f"{stage}:{kind}", {})})


def demo_sets() -> list[str]:
    """:data:`DEMO` as pipeline ``--set`` items (``stage.key=value``)."""
    return [f"{stage}.{key}={value}" for stage, opts in DEMO.items() for key, value in opts.items()]
