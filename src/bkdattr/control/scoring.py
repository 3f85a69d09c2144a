"""Scoring generated replies for the control experiments.

* **ASR** -- :meth:`bkdattr.inject.tasks.Task.asr` on the task's counted examples (label_flip: source-label
  rows only); on clean prompts the same rule gives the **false-trigger rate**. The robust ASR
  (:meth:`Task.robust_asr`, paraphrase-tolerant for fixed_output) is reported beside it.
* **Reply similarity** (clean side effects) -- how far an edit moves a clean reply from the unedited model's
  reply to the same prompt: ``difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()`` on the two reply
  strings (characters; 1.0 identical, 0.0 nothing in common; two empty replies count as 1.0), averaged over
  prompts, plus the share of replies left exactly identical.
"""

from __future__ import annotations

import difflib
import statistics
from collections.abc import Sequence
from typing import Any

SIMILARITY_DOC = "difflib.SequenceMatcher ratio between the edited and the unedited reply (characters), mean"


def reply_similarity(a: str, b: str) -> float:
    """``difflib`` ratio of two replies in [0, 1] (1.0 when both are empty)."""
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def asr_scores(task, replies: Sequence[str], examples: Sequence) -> dict[str, float]:
    """``{"asr", "robust_asr"}`` of replies to ``examples`` (prompts in the same order)."""
    return {"asr": task.asr(replies, examples), "robust_asr": task.robust_asr(replies, examples)}


def side_effect(task, replies: Sequence[str], baseline: Sequence[str], examples: Sequence) -> dict[str, float]:
    """Clean-prompt side effect of an edit: ``false_trigger_rate`` (ASR rule on clean replies),
    ``similarity`` (mean :func:`reply_similarity` to ``baseline``), ``identical_share``."""
    sims = [reply_similarity(a, b) for a, b in zip(replies, baseline, strict=True)]
    return {"false_trigger_rate": task.asr(replies, examples),
            "similarity": sum(sims) / max(1, len(sims)),
            "identical_share": sum(a == b for a, b in zip(replies, baseline, strict=True)) / max(1, len(sims))}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "min", "max", "values"}`` of repeated measurements (std: population, 0 for one)."""
    vals = [float(v) for v in values]
    return {"mean": sum(vals) / len(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "values": vals}
