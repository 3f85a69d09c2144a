"""Control stage: switch the backdoor off (head ablation) or on/off along one direction (Backdoor Vector).

* :mod:`.edits` -- :class:`Edit` (zero heads / add vectors at ``p(x)``) and the per-row form for batched sweeps.
* :mod:`.sweep` -- :func:`sweep_generate`: greedy replies under many edits sharing the unedited prefix.
* :mod:`.ablation` -- ASR vs k for the top-k heads by ACIE and k random heads, clean side effects.
* :mod:`.vector` -- :func:`build_vector`, :func:`apply_vector`, save/load (the means ``abar`` come from
  :func:`bkdattr.attribution.means.mean_contributions`, re-exported here).
* :mod:`.vector_eval` -- the layer sweep (val), best layer, test results, controls, dose-response.
* :mod:`.stage` -- the ``ablate`` / ``vector`` stages on a run folder (commands: :mod:`bkdattr.app.commands.control`).
"""

from ..attribution.means import mean_contributions
from .ablation import DEFAULT_KS, k_values, run_ablation, share_k
from .edits import Edit, rowwise_context
from .sweep import SweepStats, plain_generate, sweep_generate
from .vector import BackdoorVector, apply_vector, build_vector, load_vector, random_heads, random_like, save_vector

__all__ = [
    "DEFAULT_KS", "BackdoorVector", "Edit", "SweepStats", "apply_vector", "build_vector", "k_values", "load_vector",
    "mean_contributions", "plain_generate", "random_heads", "random_like", "rowwise_context", "run_ablation",
    "save_vector", "share_k", "sweep_generate",
]
