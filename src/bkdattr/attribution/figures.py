"""Figures and console tables of an attribution result.

:func:`plot_acie` draws the layer x head ACIE heatmap (diverging colours centred at 0, the top-k heads
outlined) with the shared style of :mod:`bkdattr.core.figures`; the stage saves it as
``RUN/figures/attribution_acie.png``. :func:`top_table` builds the rich table printed by ``bkdattr attribute``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.table import Table

from ..core.figures import new_figure, save_figure
from .baha import AttributionResult
from .scores import METRICS

FIGURE_NAME = "attribution_acie.png"
_LABELS = {"geomean_prob": "P(y|x) (geometric mean)", "first_token_logprob": "first-token log-prob",
           "sum_logprob": "summed log-prob"}


def plot_acie(result: AttributionResult, path: str | Path, metric: str | None = None, top_k: int = 8) -> Path:
    """Save the ``[L, H]`` ACIE heatmap of ``metric`` (default: the ranking metric) as a PNG at ``path``."""
    from matplotlib.patches import Rectangle  # lazy: matplotlib loads with the first figure (bkdattr.core.figures)

    m = metric or result.metric
    acie = result.acie[m].clone()
    n_layers, n_heads = acie.shape
    finite = acie[~torch.isnan(acie)]
    vmax = float(finite.abs().max()) if finite.numel() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    fig, ax = new_figure(width=min(12.0, 2.5 + 0.45 * n_heads), height=min(14.0, 1.5 + 0.22 * n_layers))
    ax.grid(False)
    im = ax.imshow(acie.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower",
                   interpolation="nearest")
    for rank, (layer, h, v) in enumerate(result.top_heads(top_k, m), start=1):
        ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
        ax.text(h, layer, str(rank), ha="center", va="center", fontsize=6,
                color="white" if abs(v) > 0.6 * vmax else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    step = max(1, n_layers // 15)
    ax.set_yticks(range(0, n_layers, step))
    ax.set_xticks(range(0, n_heads, max(1, n_heads // 16)))
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cb.set_label(f"ACIE ({_LABELS.get(m, m)})")
    ax.set_title(f"BAHA: ACIE per head ({result.method}, {result.n_prompts} prompts; top {top_k} numbered)")
    return save_figure(fig, path)


def top_table(result: AttributionResult, k: int = 16):
    """A rich table of the top-``k`` heads: rank, layer, head and the ACIE of every computed metric (the
    ranking metric first)."""
    shown = [result.metric] + [m for m in METRICS if m != result.metric
                               and not torch.isnan(result.acie[m][result.evaluated]).all()]
    t = Table(title=f"BAHA top {k} heads ({result.method}, ranked by {result.metric}, "
                    f"{result.n_prompts} prompts, {result.seconds:.1f} s)")
    for col in ("rank", "layer", "head"):
        t.add_column(col, justify="right")
    for m in shown:
        t.add_column(f"ACIE {m}", justify="right")
    for rank, (layer, h, _v) in enumerate(result.top_heads(k), start=1):
        t.add_row(str(rank), str(layer), str(h), *[f"{float(result.acie[m][layer, h]):+.4g}" for m in shown])
    return t
