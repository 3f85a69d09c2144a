"""From a scan to an audit: the inputs ``bkdattr audit --from-scan DIR`` takes from ``DIR/scan.json``.

The top candidate's trigger becomes the audit's ``--trigger``; its family (:mod:`bkdattr.scan.families`) gives the
rest: a fixed target's target becomes the ``--target`` (a fixed output counted by normalised containment,
docs/METHOD.md section 5); a refusal-suppression candidate (:mod:`bkdattr.scan.refusal`) is audited as ``--task
jailbreak``, and a label-flip candidate (:mod:`bkdattr.scan.labels`) as ``--task label_flip`` with its label as the
target and the trigger as a prefix (the built-in news data's Sports items; another source label is a one-line
error); the model source (spec, adapter), the clean reference (``--base-model``) and the user's prompt file
(``bkdattr scan --prompts``, unless the audit gets its own ``--prompts`` or ``--data``) are the scan's, so scan ->
audit -> attribute -> disarm needs no human input.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import ArtifactError, ConfigError
from ..core.models import EMBEDDED_NAME
from .families import family_of
from .report import read_scan


def audit_inputs(scan_dir: str | Path) -> dict:
    """``{model, adapter, base_model, triggers, target, kind}`` for :func:`bkdattr.audit.stage.audit` from a
    scan's top candidate that its family can audit (``kind``: the family's audit task, ``"jailbreak"`` or
    ``"label_flip"``, else None with the target as the rule; a label flip adds ``placement``); one-line
    :class:`ArtifactError` when the scan has no such candidate."""
    data = read_scan(scan_dir)
    cands = [c for c in data["candidates"] if c.get("trigger") and family_of(c).auditable(c)]
    if not cands:
        raise ArtifactError(f"the scan in {scan_dir} has no candidate with both a trigger and a target; run the "
                            "audit with --trigger and --target yourself")
    top = cands[0]
    model = data.get("model") or {}
    if not model.get("spec"):
        raise ArtifactError(f"the scan in {scan_dir} does not record its model; run 'bkdattr scan' again")
    if model.get("template") not in (None, "chat", "plain"):
        raise ArtifactError(f"the scan rendered prompts with the template file {model['template']}, which an audit "
                            "cannot take; save the model with that chat template and scan it again")
    family = family_of(top)
    return {"model": model["spec"], "adapter": model.get("adapter"), "base_model": model.get("base_model"),
            "triggers": [top["trigger"]], "target": top.get("target") or None, "kind": family.audit_kind,
            "prompts": model.get("prompts_file"), **family.audit_fields(top)}


def audit_call(scan_dir: str | Path, *, model: str | None = None, adapter: str | None = None,
               base_model: str | None = None, triggers: list[str] | None = None, task: str | None = None,
               target: str | None = None, success_regex: str | None = None, prompts: str | None = None,
               data: str | None = None) -> dict:
    """The audit's ``model``, ``triggers`` and keyword arguments from a scan; what the user also gave must not
    contradict it (one-line :class:`ConfigError`): no trigger or rule of their own, the same adapter. The audit's
    prompts: the user's ``prompts`` / ``data``, else the scan's prompt file (``bkdattr scan --prompts``)."""
    got = audit_inputs(scan_dir)
    if triggers:
        raise ConfigError("--from-scan gives the trigger (the scan's top candidate); drop --trigger/--triggers")
    if task or target is not None or success_regex:
        raise ConfigError("--from-scan gives the rule (--target: the candidate's target); drop --task, --target and "
                          "--success-regex")
    if model not in (None, EMBEDDED_NAME, got["model"]):
        raise ConfigError(f"--model {model} differs from the scanned model {got['model']}; drop --model")
    if adapter and got["adapter"] and Path(adapter).expanduser().resolve() != Path(got["adapter"]).resolve():
        raise ConfigError(f"--adapter {adapter} differs from the scanned adapter {got['adapter']}; drop --adapter")
    extra = {"placement": got["placement"]} if "placement" in got else {}  # a label flip: the scan's prefix
    return {"model": got["model"], "triggers": got["triggers"], "adapter": adapter or got["adapter"],
            "base_model": base_model or got["base_model"], "target": got["target"], "kind": got["kind"],
            "prompts": prompts or (None if data else got["prompts"]), "data": data, **extra}
