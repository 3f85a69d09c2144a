"""The stage figures the report shows: fixed names under ``RUN/figures/`` and their captions (the report embeds
whichever exist; each stage draws its own through :mod:`bkdattr.core.figures`)."""

from __future__ import annotations

FIGURE_NAMES = {
    "probe_icla_mlp": "Cross-layer probe accuracy (ICLA), MLP probes",
    "probe_icla_svm": "Cross-layer probe accuracy (ICLA), SVM probes",
    "probe_accuracy": "Probe accuracy per layer: backdoored model vs clean-model control",
    "attribution_acie": "BAHA: ACIE of every attention head",
    "ablation_asr_vs_k": "ASR after ablating the top-k heads vs k random heads",
    "vector_asr_vs_layer": "Backdoor Vector: ASR per layer (add on clean, subtract on triggered)",
    "vector_dose_response": "Backdoor Vector dose-response: ASR vs alpha",
}
