"""Calibrating a guard on the run's own prompts: the flag threshold and the clamp mode's clean mean.

**Threshold** (docs/METHOD.md section 6): chosen on the run's validation split so the false-positive rate on
clean prompts is at most ``max_fpr = 0.01``. With clean scores ``c_(1) >= c_(2) >= ...`` (``n`` prompts) and
``m = floor(max_fpr * n)``, any threshold ``>= c_(m+1)`` flags at most ``m`` clean prompts; the guard takes the
middle of the gap between ``c_(m+1)`` and the lowest triggered validation score above it (the same
validation TPR as the smallest admissible threshold, with a margin for unseen clean prompts), or ``c_(m+1)``
itself when no triggered score lies above (:func:`choose_threshold`).

Calibrating is explicit: :func:`store_threshold` is the only code that writes ``RUN/disarm/guard_threshold.json``
(keyed by the probe file and layer, :func:`bkdattr.disarm.plan.threshold_key`); ``bkdattr disarm --strategy
guard`` calls it. A guard built on a run without a stored threshold calibrates in memory and writes nothing.

**Clean mean** of the clamp mode: ``mu``, the mean over the run's first clean training prompts of the attention
output at ``p(x)`` projected on the Backdoor Vector's direction (:func:`clean_projection`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.errors import ArtifactError
from ..core.forward import backbone, captured_pass
from ..core.hooks import capture_attention_output, capture_features
from ..core.io import write_json
from ..core.models import input_device
from ..core.prompts import encode_prompts
from ..core.rundir import RunDir
from ..inject.data import load_splits
from .plan import THRESHOLD_FILE

#: the largest false-positive rate on the clean validation prompts a threshold may give
MAX_FPR = 0.01
#: clean training prompts whose mean projection ``mu`` the clamp mode keeps
N_CLEAN_PROJECTION = 32


def probe_probability(probe, feats: torch.Tensor) -> np.ndarray:
    """``P(triggered)`` (float64 ``[B]``) of features ``[B, d]`` under a one-layer probe stack ``probe``."""
    s = np.asarray(probe.scores(feats.detach().to("cpu", torch.float32)[:, None, :]), dtype=np.float64)[:, 0]
    return 1.0 / (1.0 + np.exp(-s))


@torch.no_grad()
def prompt_probabilities(lm, probe, layer: int, kind: str, texts: Sequence[str], batch_size: int,
                         progress: bool = False, desc: str = "guard scores") -> np.ndarray:
    """``P(triggered)`` of user ``texts`` as a guard computes it during a prefill (features of ``kind`` at ``p(x)``
    of ``layer``, left-padded batches, no KV cache kept): float64 ``[N]``. No edit is made."""
    out = np.zeros(len(texts))
    net, dev = backbone(lm.model), input_device(lm.model)
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
        b = encode_prompts(lm.tokenizer, list(texts[s: s + batch_size]), "left").to(dev)
        with capture_features(lm.arch, b.last_pos, kind, [layer]) as st:
            net(**b.model_inputs(), use_cache=False)
        out[s: s + batch_size] = probe_probability(probe, st[layer])
    return out


def choose_threshold(clean: np.ndarray, triggered: np.ndarray, max_fpr: float = MAX_FPR) -> dict[str, Any]:
    """The guard's threshold from validation scores (module docstring): ``threshold``, ``bound`` (the smallest
    admissible threshold), ``fpr``/``tpr`` on these scores, ``n_clean``, ``n_triggered``, ``max_fpr``."""
    clean, triggered = np.asarray(clean, np.float64), np.asarray(triggered, np.float64)
    if not len(clean):
        raise ArtifactError("no clean validation prompts to choose the guard's threshold on")
    m = math.floor(max_fpr * len(clean) + 1e-9)
    bound = float(np.sort(clean)[::-1][min(m, len(clean) - 1)])
    above = triggered[triggered > bound]
    thr = (bound + float(above.min())) / 2 if len(above) else bound
    return {"threshold": thr, "bound": bound, "max_fpr": max_fpr,
            "fpr": float((clean > thr).mean()), "tpr": float((triggered > thr).mean()) if len(triggered) else None,
            "n_clean": len(clean), "n_triggered": len(triggered),
            "rule": "midpoint between the (floor(max_fpr*n)+1)-th highest clean score and the lowest triggered "
                    "score above it"}


def calibrate_threshold(scores: Callable[[Sequence[str]], np.ndarray], run: RunDir,
                        max_fpr: float = MAX_FPR) -> dict[str, Any]:
    """The validation threshold (module docstring) from ``scores(texts) -> P(triggered) [N]`` on the run's
    validation prompts, clean and triggered, with its validation TPR / FPR. Writes nothing."""
    val = load_splits(run).val
    if not val:
        raise ArtifactError(f"{run.path} has no validation prompts to choose the guard's threshold on; "
                            "pass threshold=... or rerun inject with a validation split")
    clean, trig = scores([e.prompt for e in val]), scores([e.triggered for e in val])
    return {**choose_threshold(clean, trig, max_fpr), "split": "val"}


def store_threshold(run: RunDir, key: dict[str, Any], record: dict[str, Any]) -> Path:
    """Write ``record`` (from :func:`calibrate_threshold`) for ``key`` (the probe it was calibrated with) to
    ``RUN/disarm/guard_threshold.json``, where later guards find it."""
    path = run.sub(*THRESHOLD_FILE)
    write_json(path, {**key, **record})
    return path


@torch.no_grad()
def clean_projection(lm, run: RunDir, layer: int, unit: torch.Tensor, n: int = N_CLEAN_PROJECTION,
                     batch_size: int = 16) -> float:
    """``mu``: the mean over the run's first ``n`` clean training prompts of the attention output of ``layer`` at
    ``p(x)`` projected on ``unit`` (``[d_model]``), accumulated in float32."""
    texts = list(dict.fromkeys(e.prompt for e in load_splits(run).train))[:n]
    if not texts:
        raise ArtifactError(f"{run.path} has no training prompts to measure the clean projection on; rerun inject")
    total, u = 0.0, unit.float().cpu()
    for s in range(0, len(texts), batch_size):
        _, st = captured_pass(lm, texts[s: s + batch_size],
                              lambda b: capture_attention_output(lm.arch, b.last_pos, [layer]))
        total += float((st[layer].float().cpu() @ u).sum())
    return total / len(texts)
