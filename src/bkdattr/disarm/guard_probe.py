"""The guard's own detector: MLP probes trained on the run's **training** prompts only.

The probe stage prefers held-out prompts (the model never saw them), so its probes are trained on the very
validation and test prompts the guard's threshold is chosen on and its detection is measured on; detection
figures from those probes would be optimistic. :func:`fit_guard_probe` trains a detector for the guard that
has seen none of them (docs/METHOD.md section 6):

1. **Prompts**: the run's training split, distinct prompts, each as its clean (label 0) and triggered (label 1)
   version; 80% of the prompts train, 20% validate (seeded, by prompt: both versions of a prompt land in the
   same part).
2. **Features** at ``p(x)`` of every layer ``0..max_layer`` (``max_layer``: the first edited layer, so one
   forward pass can read and then edit), of the probe stage's kind (``attn_input`` by default), float32.
3. **Probes**: one MLP per layer with the probe stage's hyper-parameters, early-stopped on the validation part;
   the guard's layer is the best by validation accuracy (ties: lower validation loss, then the earlier layer).
4. Saved as ``RUN/disarm/guard_probe.safetensors`` (that layer only, with ``meta.source = "train split"``).

The run's validation split then chooses the threshold and the edit, and its test split measures them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import DataError
from ..core.rundir import RunDir, get_nested
from ..inject.data import load_splits
from ..probe.features import extract_features
from ..probe.probes import MLPProbeConfig, train_mlp_probes
from .plan import GUARD_PROBE, probe_layer_at_most

#: fewest distinct training prompts the guard's probe is trained on
MIN_PROMPTS = 6


def training_prompts(splits) -> list[tuple[str, str]]:
    """``(clean, triggered)`` of the training split's distinct prompts (whitespace- and case-folded)."""
    seen: set[str] = set()
    out = []
    for e in splits.train:
        key = " ".join(e.prompt.split()).lower()
        if key in seen or not e.triggered or e.triggered == e.prompt:
            continue
        seen.add(key)
        out.append((e.prompt, e.triggered))
    return out


def fit_guard_probe(run: RunDir, lm, max_layer: int, kind: str = "attn_input", seed: int = 0,
                    batch_size: int = 16, progress: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train the guard's probes on ``run``'s training prompts (module docstring) and save the best layer's;
    returns the file and a summary (``layer``, ``val_accuracy`` per layer, ``n_prompts``)."""
    pairs = training_prompts(load_splits(run))
    if len(pairs) < MIN_PROMPTS:
        raise DataError(f"the run has {len(pairs)} distinct training prompts with a trigger; the guard's probe needs "
                        f"at least {MIN_PROMPTS}: rerun inject (or audit) with more training prompts")
    n = len(pairs)
    layers = list(range(int(max_layer) + 1))
    feats = extract_features(lm, [c for c, _ in pairs] + [t for _, t in pairs], kind, batch_size, layers=layers,
                             progress=progress, desc="guard probe features")  # [2n, L, d]
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(0.2 * n))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]

    def rows(idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        both = np.concatenate([idx, idx + n])
        return feats[torch.as_tensor(both)], np.concatenate([np.zeros(len(idx)), np.ones(len(idx))])

    x_tr, y_tr = rows(tr_idx)
    x_va, y_va = rows(val_idx)
    saved = get_nested(run.metrics(), "probe.config.mlp") or {}
    cfg = MLPProbeConfig(**{**{k: v for k, v in saved.items() if k in MLPProbeConfig.__dataclass_fields__},
                            "seed": seed})
    probes = train_mlp_probes(x_tr, y_tr, x_va, y_va, cfg, layers)
    acc = ((probes.scores(x_va) > 0) == y_va[:, None].astype(bool)).mean(0)  # [L]
    probes.meta.update(val_accuracy=[float(a) for a in acc], kind=kind, source="train split",
                       n_prompts=n, n_val_prompts=int(n_val))
    layer, _why = probe_layer_at_most(probes, int(max_layer))
    best = probes.select([probes.position(layer)])
    best.meta.update(val_accuracy=[float(acc[probes.position(layer)])], val_accuracy_all_layers=probes.meta[
        "val_accuracy"])
    path = run.sub(*GUARD_PROBE)
    best.save(path)
    return path, {"layer": layer, "val_accuracy": [float(a) for a in acc], "n_prompts": n, "n_val_prompts": n_val,
                  "kind": kind, "file": str(Path(*GUARD_PROBE))}
