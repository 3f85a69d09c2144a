"""Figures of the control stages (PNG, via :mod:`bkdattr.core.figures`), drawn from the metrics sections.

* ``ablation_asr_vs_k.png`` -- ASR on triggered prompts after ablating the top-k heads vs k random heads
  (mean, min-max band over seeds); right panel: similarity of clean replies to the unablated replies.
* ``vector_asr_vs_layer.png`` -- validation ASR per layer: add on clean prompts and subtract on triggered
  prompts, each with its same-norm random-vector control; the chosen layer is marked.
* ``vector_dose_response.png`` -- test ASR vs alpha at the chosen layer, vector vs same-norm random vector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.figures import new_figure, save_figure

ABLATION_FIGURE = "ablation_asr_vs_k.png"
LAYER_FIGURE = "vector_asr_vs_layer.png"
DOSE_FIGURE = "vector_dose_response.png"


def _style(ax, xlabel: str, ylabel: str, title: str, top: float = 1.03, **legend) -> None:
    """Axis labels, the ASR range ``[-0.03, top]``, a small legend (``legend``: its options) and the title."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, top)
    ax.legend(fontsize=7, **legend)
    ax.set_title(title)


def plot_ablation(m: dict[str, Any], path: str | Path) -> Path:
    """ASR vs k (top-k vs random with spread) and clean-reply similarity vs k, from the ``ablation`` section."""
    ks = [int(k) for k in m["ks"]]
    x = list(range(len(ks)))  # categorical axis: k = 0, 1, 2, 4, ... evenly spaced
    side = m.get("clean_side_effect")
    fig, axes = new_figure(9.5 if side else 5.5, 3.4, ncols=2 if side else 1)
    ax = axes[0] if side else axes
    top = [m["topk"][str(k)] for k in ks]
    rnd = [m["random"][str(k)] for k in ks]
    ax.plot(x, top, "o-", color="C3", label="top-k heads (ACIE)")
    ax.plot(x, [r["mean"] for r in rnd], "s--", color="C0", label=f"k random heads ({len(m['random_seeds'])} seeds)")
    ax.fill_between(x, [r["min"] for r in rnd], [r["max"] for r in rnd], color="C0", alpha=0.2, label="random min-max")
    ax.set_xticks(x, [str(k) for k in ks])
    _style(ax, "heads ablated (k)", "ASR (triggered, held out)", "Head ablation at p(x)")
    if side:
        ax2 = axes[1]
        ax2.plot(x, [side["topk"][str(k)]["similarity"] for k in ks], "o-", color="C3", label="top-k: similarity")
        ax2.plot(x, [side["topk"][str(k)]["false_trigger_rate"] for k in ks], "^:", color="C3",
                 label="top-k: false-trigger rate")
        if "random" in side:
            rs = [side["random"][str(k)]["similarity"] for k in ks]
            ax2.plot(x, [r["mean"] for r in rs], "s--", color="C0", label="random: similarity")
            ax2.fill_between(x, [r["min"] for r in rs], [r["max"] for r in rs], color="C0", alpha=0.2)
        ax2.set_xticks(x, [str(k) for k in ks])
        _style(ax2, "heads ablated (k)", "clean prompts", "Side effect: similarity to unablated replies")
    return save_figure(fig, path)


def plot_layers(m: dict[str, Any], path: str | Path) -> Path:
    """Validation ASR per layer for add / subtract and their random-vector controls."""
    layers = [int(x) for x in m["layers"]]
    fig, ax = new_figure(7.0, 3.6)
    get = lambda key: [m[key][str(x)] for x in layers]  # noqa: E731
    ax.plot(layers, get("add"), "o-", color="C3", label="add v (clean prompts)")
    ax.plot(layers, get("random_add"), "o:", color="C3", alpha=0.5, label="add random, same norm")
    ax.plot(layers, get("subtract"), "s-", color="C0", label="subtract v (triggered prompts)")
    ax.plot(layers, get("random_subtract"), "s:", color="C0", alpha=0.5, label="subtract random, same norm")
    base = m.get("baseline_val", {})
    if "triggered_asr" in base:
        ax.axhline(base["triggered_asr"], color="C0", lw=0.8, ls="--", label="triggered, unedited")
    if "clean_false_trigger_rate" in base:
        ax.axhline(base["clean_false_trigger_rate"], color="C3", lw=0.8, ls="--", label="clean, unedited")
    ax.axvline(m["best_layer"], color="k", lw=0.8, alpha=0.6)
    ax.text(m["best_layer"], 1.04, f"chosen L{m['best_layer']}", ha="center", fontsize=7)
    _style(ax, "layer of the edit", f"ASR (validation, alpha={m['alpha']:g})",
           f"Backdoor Vector per layer (|v|={m.get('norms', {}).get('vector', float('nan')):.1f})", top=1.1, ncol=3,
           loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    return save_figure(fig, path)


def plot_dose(m: dict[str, Any], path: str | Path) -> Path:
    """Test ASR vs alpha at the chosen layer: vector vs same-norm random vector, both directions."""
    d = m["dose_response"]
    a = d["alphas"]
    fig, ax = new_figure(6.0, 3.6)
    ax.plot(a, d["add"]["vector"], "o-", color="C3", label="add v (clean)")
    ax.plot(a, d["add"]["random"], "o:", color="C3", alpha=0.5, label="add random (clean)")
    ax.plot(a, d["subtract"]["vector"], "s-", color="C0", label="subtract v (triggered)")
    ax.plot(a, d["subtract"]["random"], "s:", color="C0", alpha=0.5, label="subtract random (triggered)")
    _style(ax, "alpha (multiple of v; random vector has |v|)", "ASR (test)", f"Dose-response at layer {d['layer']}")
    return save_figure(fig, path)
