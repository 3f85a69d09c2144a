"""Figure helpers shared by every stage: headless matplotlib, atomic PNG writes, one style.

matplotlib is imported on the first figure, not with this module: it is slow to import, and selecting the
headless ``Agg`` backend is a process-wide side effect that only a process drawing figures should have.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from .io import atomic_path

#: the project style (rcParams)
STYLE = {"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False}


@functools.cache
def pyplot() -> Any:
    """``matplotlib.pyplot`` on the ``Agg`` backend with :data:`STYLE` applied (once per process)."""
    import matplotlib  # lazy: slow to import; the Agg backend is a process-wide side effect (module docstring)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as matplotlib above

    plt.rcParams.update(STYLE)
    return plt


def new_figure(width: float = 6.0, height: float = 3.6, **kw) -> tuple[Any, Any]:
    """A new ``(fig, ax)`` in the project style (``kw``: :func:`matplotlib.pyplot.subplots` options)."""
    return pyplot().subplots(figsize=(width, height), **kw)


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    pyplot().close(fig)
    return path
