"""The guard's plan, read from the run's files: which probe and layer, which threshold, which edit.

Everything here reads the run folder and writes nothing: the probes (the guard's own,
:mod:`bkdattr.disarm.guard_probe`, or the probe stage's), the Backdoor Vector with its layer and scale (vector
stage), the head ranking and the disarming k (attribution and ablation stages), the edit ``bkdattr disarm
--strategy guard`` chose on validation (``RUN/disarm/guard_plan.json``) and the stored threshold
(``RUN/disarm/guard_threshold.json``, written by :func:`bkdattr.disarm.calibrate.store_threshold` only).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..control.ablation import share_k
from ..control.stage import load_ranking
from ..control.vector import load_vector
from ..core.errors import ArtifactError, ConfigError, InputFileError
from ..core.io import read_json
from ..core.rundir import RunDir, get_nested
from ..probe.detector import best_layer
from ..probe.probes import MLPProbes, SVMProbes
from .config import TARGET_ASR

#: the guard's own probe (trained on the training split by ``bkdattr disarm --strategy guard``), under the run
GUARD_PROBE = ("disarm", "guard_probe.safetensors")
#: the validation threshold, keyed by the probe file and layer (written by the calibration only)
THRESHOLD_FILE = ("disarm", "guard_threshold.json")
#: the edit ``bkdattr disarm --strategy guard`` chose on validation
PLAN_FILE = ("disarm", "guard_plan.json")
#: which probe a guard reads: ``auto`` (the guard's own when it fits, else the probe stage's MLP), or one of them
PROBES = ("auto", "guard", "mlp", "svm")


@dataclass
class GuardPlan:
    """What a guard does, JSON-serialisable: the probe (layer, kind, why that layer), the threshold and where
    it came from, the action and its edit (vector layer and scale, or the heads)."""

    action: str
    probe_layer: int
    probe_kind: str
    probe_layer_reason: str
    edit_layers: list[int]
    threshold: float = float("nan")
    threshold_source: str = ""
    vector_layer: int | None = None
    alpha: float | None = None
    vector_norm: float | None = None
    heads: list[list[int]] = field(default_factory=list)
    k: int | None = None
    k_reason: str | None = None
    scope: str = "prompt"
    mode: str = "subtract"  # vector action: subtract alpha * v, or clamp the component along v to its clean mean
    clean_projection: float | None = None  # clamp mode: mu
    edit_source: str = "the control stages"
    control_seed: int | None = None  # set: the same-size random control (random vector / random heads)
    probe_file: str = ""  # relative to the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_path(run: RunDir, probe: str) -> Path:
    """The probe file of ``probe``: ``guard`` (the guard's own, trained on the training split by ``bkdattr
    disarm --strategy guard``), ``mlp`` / ``svm`` (the probe stage's backdoored-model probes)."""
    if probe not in PROBES:
        raise ConfigError(f"unknown probe '{probe}'; use one of {', '.join(PROBES)}")
    if probe == "guard":
        path = run.path.joinpath(*GUARD_PROBE)
        if not path.is_file():
            raise InputFileError(f"{path} missing: the guard's own probe is trained by 'bkdattr disarm -r {run.path} "
                                 "--strategy guard'; run that first or use probe='mlp'")
        return path
    path = run.path / "probe" / ("backdoored_mlp.safetensors" if probe == "mlp" else "backdoored_svm.npz")
    if not path.is_file():
        raise InputFileError(f"{path} missing: the guard needs the probe stage's results; run 'bkdattr probe "
                             f"--run {run.path}' first")
    return path


def load_probes(run: RunDir, probe: str, max_layer: int) -> tuple[Path, MLPProbes | SVMProbes]:
    """``(path, probes)`` for ``probe``; ``auto``: the guard's own probe when it exists and reads a layer
    ``<= max_layer``, else the probe stage's MLP probes."""
    if probe == "auto":
        own = run.path.joinpath(*GUARD_PROBE)
        if own.is_file():
            probes = MLPProbes.load(own)
            if min(probes.layers) <= max_layer:
                return own, probes
        probe = "mlp"
    path = probe_path(run, probe)
    return path, MLPProbes.load(path) if probe != "svm" else SVMProbes.load(path)


def probe_layer_at_most(probes, max_layer: int) -> tuple[int, str]:
    """The probe layer to read: the best by validation accuracy (ties: lowest validation loss for MLPs, then
    the earliest) among the probes of layers ``<= max_layer``; and the reason in words."""
    val = probes.meta.get("val_accuracy")
    if not val:
        raise ArtifactError("the saved probes carry no validation accuracy; rerun 'bkdattr probe'")
    best = best_layer(probes)
    if best <= max_layer:
        return best, f"the probe's best layer ({best}, validation accuracy {float(val[probes.position(best)]):.3f})"
    cand = [i for i, x in enumerate(probes.layers) if x <= max_layer]
    if not cand:
        raise ArtifactError(f"no probe at or before the edit layer {max_layer}; rerun 'bkdattr probe' on every layer")
    acc = np.asarray(val, dtype=np.float64)
    top = [i for i in cand if acc[i] == acc[cand].max()]
    if len(top) > 1 and hasattr(probes, "best_val_loss"):
        loss = [probes.best_val_loss[i] for i in top]
        top = [top[int(np.argmin(loss))]]
    layer = int(probes.layers[top[0]])
    return layer, (f"the probe's best layer {best} comes after the edit layer {max_layer}; the best probe at or "
                   f"before it is layer {layer} (validation accuracy {float(acc[top[0]]):.3f})")


def vector_edit(run: RunDir, d_model: int, layer: int | None, alpha: float | None) -> tuple[torch.Tensor, int, float]:
    """The vector action's ``(v [d_model], layer, alpha)``: the vector stage's Backdoor Vector, at its best layer
    and scale unless ``layer`` / ``alpha`` are given."""
    path = run.path / "control" / "backdoor_vector.safetensors"
    m = run.metrics()
    if not path.is_file() or get_nested(m, "vector.best_layer") is None:
        raise InputFileError(f"{path} or metrics.vector missing: the guard's vector action needs the vector stage's "
                             f"results; run 'bkdattr vector --run {run.path}' first")
    v = load_vector(path, d_model).vector.float()
    return v, int(layer if layer is not None else get_nested(m, "vector.best_layer")), float(
        alpha if alpha is not None else get_nested(m, "vector.alpha", 1.0))


def disarming_k(run: RunDir, n_total: int, target_asr: float = TARGET_ASR) -> tuple[int, str]:
    """``k`` of the heads action: the smallest k > 0 whose ablation ASR (metrics.ablation.topk) is
    <= ``target_asr``, else the largest k tried; without an ablation section the k nearest 3% of all heads."""
    topk = get_nested(run.metrics(), "ablation.topk")
    if not topk:
        k = share_k(n_total)
        return k, f"no ablation results: the k nearest 3% of all heads ({k})"
    tried = sorted((int(k), float(a)) for k, a in topk.items() if int(k) > 0)
    if not tried:
        raise ArtifactError("metrics.ablation.topk lists no k > 0; rerun 'bkdattr ablate' with ks above 0")
    ok = [k for k, a in tried if a <= target_asr]
    if ok:
        return ok[0], f"the smallest k whose ablation ASR is <= {target_asr}"
    return tried[-1][0], f"no k tried brings the ablation ASR to <= {target_asr}: the largest k tried"


def heads_edit(run: RunDir, arch, k: int | None, target_asr: float = TARGET_ASR
               ) -> tuple[list[tuple[int, int]], int, str]:
    """The heads action's ``(heads, k, why)``: the top-``k`` heads of the BAHA ranking (``k`` default:
    :func:`disarming_k`)."""
    k, why = (int(k), "given") if k is not None else disarming_k(run, arch.n_total_heads, target_asr)
    ranking, _info = load_ranking(run, 0, arch.n_layers, arch.n_heads)  # the listed heads, checked against this model
    if not 1 <= k <= len(ranking):
        raise ConfigError(f"k={k} heads asked for but the ranking lists {len(ranking)} (the model has "
                          f"{arch.n_total_heads}); pick k in 1..{len(ranking)}")
    return ranking[:k], k, why


def stored_plan(run: RunDir, action: str) -> dict[str, Any] | None:
    """The edit ``bkdattr disarm --strategy guard`` chose on validation for ``action`` (``RUN/disarm/
    guard_plan.json``: ``alpha``, ``vector_layer``, ``k``, ``scope``, ``mode``, and for the clamp mode its clean
    mean ``clean_projection``), or None."""
    path = run.path.joinpath(*PLAN_FILE)
    if not path.is_file():
        return None
    saved = read_json(path)
    return saved if isinstance(saved, dict) and saved.get("action") == action else None


def threshold_key(probe_file: Path, layer: int, kind: str) -> dict[str, Any]:
    """What a stored threshold is valid for: the probe file's content, the probe layer and the feature kind."""
    return {"probe_digest": hashlib.sha256(probe_file.read_bytes()).hexdigest()[:16], "probe_layer": int(layer),
            "kind": kind}


def stored_threshold(run: RunDir, key: dict[str, Any]) -> tuple[float, str] | None:
    """``(threshold, source)`` from ``RUN/disarm/guard_threshold.json`` when it was calibrated for ``key``
    (:func:`threshold_key`), else None."""
    path = run.path.joinpath(*THRESHOLD_FILE)
    if not path.is_file():
        return None
    saved = read_json(path)
    if all(saved.get(k) == v for k, v in key.items()) and isinstance(saved.get("threshold"), float):
        return float(saved["threshold"]), f"stored ({path.relative_to(run.path)})"
    return None
