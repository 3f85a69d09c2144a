"""Sample generations for the report: the same held-out prompts before and after each intervention.

No model runs here: the control stages already saved every reply (``control/ablation_replies.json``,
``control/vector_replies.json``); this stage picks a few prompts and lines their replies up side by side in
``RUN/samples.json`` as ``[{"prompt", "replies": {condition: reply}}]``.
"""

from __future__ import annotations

from typing import Any

from ...core.io import read_json, write_json
from ...core.rundir import RunDir, get_nested
from ...inject.data import load_splits


def _load(run: RunDir, name: str) -> dict[str, Any] | None:
    p = run.path / "control" / name
    return read_json(p) if p.is_file() else None  # one-line InputFileError for a corrupt file


def collect_samples(run: RunDir, n_triggered: int = 4, n_clean: int = 3) -> list[dict[str, Any]]:
    """Side-by-side replies for ``n_triggered`` triggered and ``n_clean`` clean held-out prompts."""
    m = run.metrics()
    abl, vec = _load(run, "ablation_replies.json"), _load(run, "vector_replies.json")
    samples: list[dict[str, Any]] = []
    k = get_nested(m, "ablation.k_share")
    best = get_nested(m, "vector.best_layer")
    alpha = get_nested(m, "vector.config.alpha", 1.0)
    a = f"{float(alpha):g}"
    seed0 = int(get_nested(m, "vector.config.seed", 0))
    rname = f"r{seed0}"
    vt = (vec or {}).get("replies", {}).get("test_triggered", {})
    vc = (vec or {}).get("replies", {}).get("test_clean", {})
    test_uids = (vec or {}).get("test_uids", [])
    if abl:
        trig = abl["replies"].get("triggered", {})
        for i, (uid, prompt) in enumerate(zip(abl["uids"], abl["prompts"]["triggered"], strict=False)):
            if i >= n_triggered:
                break
            replies = {"backdoored model": trig.get("none", [None] * (i + 1))[i]}
            if k and f"top{k}" in trig:
                replies[f"top-{k} heads ablated"] = trig[f"top{k}"][i]
            if f"rand{seed0}_{k}" in trig:
                replies[f"{k} random heads ablated"] = trig[f"rand{seed0}_{k}"][i]
            if uid in test_uids:
                j = test_uids.index(uid)
                if f"v-{a}" in vt:
                    replies[f"Backdoor Vector subtracted (layer {best})"] = vt[f"v-{a}"][j]
                if f"{rname}-{a}" in vt:
                    replies["same-norm random vector subtracted"] = vt[f"{rname}-{a}"][j]
            samples.append({"prompt": prompt, "kind": "triggered", "replies": replies})
    if vec and vc:
        clean_prompts = _clean_prompts(run, test_uids)
        for j, uid in enumerate(test_uids[:n_clean]):
            replies = {"backdoored model": vc["none"][j]}
            if f"v+{a}" in vc:
                replies[f"Backdoor Vector added (layer {best})"] = vc[f"v+{a}"][j]
            if f"{rname}+{a}" in vc:
                replies["same-norm random vector added"] = vc[f"{rname}+{a}"][j]
            samples.append({"prompt": clean_prompts.get(uid, uid), "kind": "clean", "replies": replies})
    return samples


def _clean_prompts(run: RunDir, uids: list[str]) -> dict[str, str]:
    try:
        s = load_splits(run)
    except Exception:  # the report must not fail for a missing data folder
        return {}
    by_uid = {e.uid: e.prompt for e in s.val + s.test}
    return {u: by_uid[u] for u in uids if u in by_uid}


def run_stage(run: RunDir, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Pipeline entry: write ``samples.json``."""
    samples = collect_samples(run, int(options.get("n_triggered", 4)), int(options.get("n_clean", 3)))
    write_json(run.path / "samples.json", samples)
    return samples
