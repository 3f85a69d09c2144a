"""Audit a model you did not build: a run folder for an existing model and a known or suspected trigger.

:func:`~bkdattr.audit.stage.audit` writes the run (splits, evaluation of the untouched model, ranking of the
candidate triggers); every later stage (probe, attribute, ablate, vector, report) then works on it unchanged.
"""

from .stage import AuditConfig, audit

__all__ = ["AuditConfig", "audit"]
