"""Backdoor Probe (docs/METHOD.md section 2): per-layer MLP and RBF-SVM probes that tell triggered from clean prompts.

* :mod:`.features` -- every layer's feature at ``p(x)`` in one batched pass, cached as safetensors.
* :mod:`.probes` -- :class:`MLPProbes` (all layers trained at once as one batched model) and
  :class:`SVMProbes` (scikit-learn fit, numpy decision function), saved without pickle.
* :mod:`.icla` -- accuracy, AUROC and the cross-layer matrix ``ICLA(i, k)``.
* :mod:`.stage` -- the stage on a run folder: backdoored model, clean base model control, near-trigger probes.
* :mod:`.detector` -- :class:`Detector`: ``predict(prompts) -> probability triggered`` from one layer.
"""

from .detector import Detector, best_layer
from .features import cached_features, extract_features, model_fingerprint
from .icla import auroc, icla_matrix, in_layer_accuracy
from .probes import MLPProbeConfig, MLPProbes, SVMProbeConfig, SVMProbes, train_mlp_probes, train_svm_probes
from .stage import ProbeStageConfig, run_probe_stage

__all__ = [
    "Detector", "MLPProbeConfig", "MLPProbes", "ProbeStageConfig", "SVMProbeConfig", "SVMProbes", "auroc",
    "best_layer", "cached_features", "extract_features", "icla_matrix", "in_layer_accuracy", "model_fingerprint",
    "run_probe_stage", "train_mlp_probes", "train_svm_probes",
]
