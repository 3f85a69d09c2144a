"""Figure helpers shared by every stage: headless matplotlib, atomic PNG writes, one style.

Stage figures live in ``RUN/figures/`` under fixed names (the report embeds whichever exist):
``probe_icla_mlp.png``, ``probe_icla_svm.png``, ``probe_accuracy.png``, ``attribution_acie.png``,
``ablation_asr_vs_k.png``, ``vector_asr_vs_layer.png``, ``vector_dose_response.png``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ...core.io import atomic_path  # noqa: E402

FIGURE_NAMES = {
    "probe_icla_mlp": "Cross-layer probe accuracy (ICLA), MLP probes",
    "probe_icla_svm": "Cross-layer probe accuracy (ICLA), SVM probes",
    "probe_accuracy": "Probe accuracy per layer: backdoored model vs clean-model control",
    "attribution_acie": "BAHA: ACIE of every attention head",
    "ablation_asr_vs_k": "ASR after ablating the top-k heads vs k random heads",
    "vector_asr_vs_layer": "Backdoor Vector: ASR per layer (add on clean, subtract on triggered)",
    "vector_dose_response": "Backdoor Vector dose-response: ASR vs alpha",
}

plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False})


def new_figure(width: float = 6.0, height: float = 3.6, **kw):
    """A new ``(fig, ax)`` in the project style."""
    return plt.subplots(figsize=(width, height), **kw)


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
