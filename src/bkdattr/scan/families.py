"""The scan's families (:mod:`bkdattr.scan.protocol`): which run, and which one a stored candidate belongs to."""

from __future__ import annotations

from .config import ScanConfig
from .fixed_target import FIXED_TARGET
from .labels import LABEL_FLIP
from .protocol import Family
from .refusal import REFUSAL

#: every family, in the order their gates run and their objectives are listed
FAMILIES: tuple[Family, ...] = (FIXED_TARGET, REFUSAL, LABEL_FLIP)


def active(cfg: ScanConfig) -> list[Family]:
    """The families a scan with ``cfg`` runs: the fixed target always, refusal suppression unless ``refusal`` is
    off, label flips unless ``labels`` is off."""
    on = {FIXED_TARGET.kind: True, REFUSAL.kind: cfg.refusal, LABEL_FLIP.kind: cfg.labels}
    return [f for f in FAMILIES if on[f.kind]]


def family_of(row: dict) -> Family:
    """The family of a candidate as ``scan.json`` stores it (by its ``rule``; none: a fixed target or a leak)."""
    rule = row.get("rule")
    return next((f for f in FAMILIES if f.rule is not None and f.rule == rule), FIXED_TARGET)
