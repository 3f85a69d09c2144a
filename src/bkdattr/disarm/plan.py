"""The guard's plan, read from the run's files: which probe, which layer, which edit.

Reads only; nothing here writes a file.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import ArtifactError
from ..probe.detector import best_layer

#: the guard's own probe (trained on the training split by ``bkdattr disarm --strategy guard``), under the run
GUARD_PROBE = ("disarm", "guard_probe.safetensors")


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
