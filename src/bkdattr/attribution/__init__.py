"""BAHA: per-head attribution of a backdoor (docs/METHOD.md section 3).

* :func:`mean_contributions` -- ``abar_{l,h}``, mean head contributions over triggered prompts ``[L, H, d]``;
* :func:`attribute` -- ACIE ``[L, H]`` (and per-prompt CIE ``[N, L, H]``) by ``exact`` (default), ``reference``
  or first-order ``attribution`` patching, returning an :class:`AttributionResult`;
* :mod:`~bkdattr.attribution.scores` -- the teacher-forced target scores (geometric-mean probability,
  first-token log-probability, summed log-probability);
* :mod:`~bkdattr.core.distributed` -- sharding across processes with torch.distributed;
* :mod:`~bkdattr.attribution.stage` -- the ``attribute`` stage on a run folder (``bkdattr attribute``).
"""

from .baha import METHODS, AttributionResult, agreement, all_heads, attribute, spearman, top_overlap
from .means import mean_contributions
from .scores import DEFAULT_METRIC, METRICS, teacher_forced_scores

__all__ = ["AttributionResult", "DEFAULT_METRIC", "METHODS", "METRICS", "agreement", "all_heads", "attribute",
           "mean_contributions", "spearman", "teacher_forced_scores", "top_overlap"]
