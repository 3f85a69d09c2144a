"""``bkdattr scan``: find candidate triggers and targets in a model with no trigger known (docs/METHOD.md,
"Scan"), then hand the best to ``bkdattr audit --from-scan``."""

from .config import THRESHOLD, ScanConfig
from .handoff import audit_inputs
from .report import read_scan, write_scan
from .stage import scan

__all__ = ["THRESHOLD", "ScanConfig", "audit_inputs", "read_scan", "scan", "write_scan"]
