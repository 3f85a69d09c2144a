"""A trained probe used as a trigger detector: ``predict(prompts) -> probability that each prompt is triggered``.

The detector runs the model up to the chosen layer's capture point for each prompt (one batched pass, only that
layer hooked) and applies that layer's probe. MLP probes give a probability (sigmoid of the logit); SVM probes
give ``sigmoid(decision value)``, an uncalibrated score whose 0.5 threshold is the SVM's decision boundary.

Read the probe stage's controls before trusting a detector: if the clean base model's probes score as high,
the detector recognises the trigger's *text* (useful for screening inputs, but not evidence of a backdoor).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, InputFileError
from ..core.models import LoadedModel
from ..core.rundir import RunDir
from .features import check_kind, extract_features
from .probes import MLPProbes, SVMProbes


class Detector:
    """Probe ``probes`` (a stack trained on the model's layers) applied at model layer ``layer`` of ``lm``."""

    def __init__(self, lm: LoadedModel, probes: MLPProbes | SVMProbes, layer: int, kind: str = "attn_input",
                 batch_size: int = 16):
        check_kind(kind)
        if probes.d_model != lm.arch.d_model:
            raise ConfigError(f"the probes expect width {probes.d_model} but the model has {lm.arch.d_model}; "
                              "use the model the probes were trained on")
        self.lm = lm
        self.layer = int(layer)
        self.probe = probes.select([probes.position(self.layer)])
        self.kind = kind
        self.batch_size = batch_size

    @classmethod
    def from_run(cls, run: RunDir | str | Path, layer: int | None = None, probe: str = "mlp",
                 setting: str = "backdoored", lm: LoadedModel | None = None, device: str = "cpu",
                 batch_size: int = 16) -> Detector:
        """Load the probes the probe stage saved for ``setting`` (``backdoored``, ``control``, ``near_trigger``,
        ``near_trigger_control``). ``layer=None`` picks the layer with the best validation accuracy (ties: the
        lowest validation loss for MLPs, else the earliest layer). ``lm`` defaults to the model of that setting."""
        run = run if isinstance(run, RunDir) else RunDir(run)
        if probe not in ("mlp", "svm"):
            raise ConfigError(f"unknown probe type '{probe}'; use mlp or svm")
        path = run.path / "probe" / (f"{setting}_mlp.safetensors" if probe == "mlp" else f"{setting}_svm.npz")
        if not path.is_file():
            raise InputFileError(f"{path} missing; run 'bkdattr probe --run {run.path}' first")
        probes = MLPProbes.load(path) if probe == "mlp" else SVMProbes.load(path)
        if layer is None:
            layer = best_layer(probes)
        if lm is None:
            base = setting in ("control", "near_trigger_control")
            lm = run.load_base_model(device) if base else run.load_model(device)
        return cls(lm, probes, layer, str(probes.meta.get("kind", "attn_input")), batch_size)

    def features(self, prompts: Sequence[str]) -> np.ndarray:
        """The chosen layer's features of ``prompts``: float32 ``[N, 1, d_model]``."""
        return extract_features(self.lm, list(prompts), self.kind, self.batch_size, layers=[self.layer]).numpy()

    def predict(self, prompts: Sequence[str]) -> np.ndarray:
        """Probability (MLP) or sigmoid score (SVM) that each prompt carries the trigger: float64 ``[N]``."""
        if not len(prompts):
            return np.zeros(0)
        return np.asarray(self.probe.predict_proba(self.features(prompts))[:, 0], dtype=np.float64)


def best_layer(probes: MLPProbes | SVMProbes) -> int:
    """The model layer whose probe has the highest validation accuracy (recorded by the probe stage; ties go
    to the lowest validation loss for MLPs, else to the earliest layer)."""
    val = probes.meta.get("val_accuracy")
    if not val:
        raise ConfigError("these probes carry no validation accuracy; pass the layer explicitly")
    val = np.asarray(val, dtype=np.float64)
    cand = np.flatnonzero(val == val.max())
    if isinstance(probes, MLPProbes) and len(cand) > 1:
        loss = np.asarray(probes.best_val_loss)[cand]
        cand = cand[[int(np.argmin(loss))]]
    return int(probes.layers[int(cand[0])])
