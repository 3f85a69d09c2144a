"""Probe evaluation: in-layer accuracy, AUROC and the cross-layer accuracy matrix ICLA.

``ICLA(i, k)`` (docs/METHOD.md section 2) is the accuracy of the probe trained on layer ``i`` when it is applied to the
held-out features of layer ``k`` (the same prompts). Its diagonal is the in-layer accuracy. A probe that
scores well far off the diagonal reads a direction the residual stream carries across layers; the paper
reports that MLP probes transfer better than SVMs.

Every function takes a probe set with the shared scoring interface of :mod:`bkdattr.probe.probes`
(``scores``: ``[N, L]``, ``cross_scores``: ``[L, Lf, N]``; a score ``> 0`` means "triggered").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .probes import Probes


def _labels(y: Any) -> np.ndarray:
    return (y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)).astype(np.int64)


def accuracy_from_scores(scores: np.ndarray, labels: Any) -> np.ndarray:
    """Share of rows where ``scores > 0`` agrees with ``labels``; ``scores [..., N]``, ``labels [N]`` -> ``[...]``."""
    return ((np.asarray(scores) > 0).astype(np.int64) == _labels(labels)).mean(-1)


def auroc(scores: np.ndarray, labels: Any) -> float:
    """Area under the ROC curve of ``scores [N]`` for ``labels [N]`` (NaN when only one class is present)."""
    from sklearn.metrics import roc_auc_score  # lazy: scikit-learn takes over a second to import

    y = _labels(labels)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def in_layer_accuracy(probes: Probes, features: Any, labels: Any) -> np.ndarray:
    """Accuracy of probe ``l`` on layer ``l``: ``features [N, L, d]`` -> ``[L]``."""
    return accuracy_from_scores(probes.scores(features).T, labels)


def icla_matrix(probes: Probes, features: Any, labels: Any) -> np.ndarray:
    """``ICLA[i, k]``: accuracy of probe ``i`` on layer ``k``'s features. ``features [N, L, d]`` -> ``[L, L]``."""
    return accuracy_from_scores(probes.cross_scores(features), labels)


def fire_rate(probes: Probes, features: Any) -> np.ndarray:
    """Share of rows each in-layer probe calls "triggered" (e.g. on near-trigger prompts): ``[L]``."""
    return (probes.scores(features) > 0).mean(0)


def transfer_summary(icla: np.ndarray) -> dict[str, float]:
    """Scalars that summarise an ICLA matrix: mean diagonal, mean off-diagonal, mean over ``|i - k| == 1``
    and the mean accuracy of probes applied to layers at least 5 apart."""
    m = np.asarray(icla, dtype=np.float64)
    n = m.shape[0]
    gap = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :])
    out = {"mean_diagonal": float(np.diag(m).mean())}
    for name, sel in (("mean_off_diagonal", gap > 0), ("mean_adjacent", gap == 1), ("mean_gap_ge_5", gap >= 5)):
        out[name] = float(m[sel].mean()) if sel.any() else float("nan")
    return out
