"""The re-scan of a defended model: ``bkdattr scan`` (docs/METHOD.md section 7) run on the model as the defence
left it, in memory, with no trigger known. A defence that restores the clean behaviour should leave nothing for
the scan to flag; one that only hides the backdoor's reply for the known trigger may still be flagged through
another candidate. The scan's folder (``scan.json``, ``report.html``) goes beside the defended model folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..core.errors import BkdAttrError, first_line
from ..core.prompts import has_chat_template
from ..scan.config import ScanConfig
from ..scan.stage import check_out, scan
from .config import DisarmConfig


def rescan_folder(out: Path) -> Path:
    """Where the re-scan of the defence saved at ``out`` writes: ``OUT-rescan`` beside it."""
    return out.parent / f"{out.name}-rescan"


def rescan_config(cfg: DisarmConfig) -> ScanConfig:
    """The scan's options: its defaults, with the run-wide seed, device, dtype, progress and ``rescan_work``."""
    opts: dict[str, Any] = {"seed": cfg.seed, "device": cfg.device, "dtype": cfg.dtype, "progress": cfg.progress,
                            "threads": cfg.threads}
    if cfg.rescan_work is not None:
        opts["budget_work"] = cfg.rescan_work
    return ScanConfig.from_options(opts)


def rescan(lm, folder: Path, cfg: DisarmConfig) -> dict[str, Any]:
    """Scan the loaded defended model ``lm`` into ``folder``; ``{verdict, score, flagged, threshold, top_trigger,
    top_target, work, budget_work, seconds, folder}``. A model without a chat template is scanned in the plain
    format it was run in. A scan that cannot run (a budget too small for one pass) warns and returns
    ``{verdict: None, error}``: the defence, already saved and measured, is kept."""
    template = None if has_chat_template(lm.tokenizer) else "plain"
    try:
        res = scan(check_out(folder), lm.name, lm=lm, cfg=rescan_config(cfg), template=template)
    except BkdAttrError as e:
        print(f"warning: the re-scan did not run ({first_line(e)})", file=sys.stderr, flush=True)
        return {"verdict": None, "score": None, "error": first_line(e), "folder": str(folder)}
    top = (res.get("candidates") or [{}])[0]
    return {"verdict": res["verdict"], "score": res["score"], "flagged": res["flagged"],
            "threshold": res.get("threshold"), "top_trigger": top.get("trigger"), "top_target": top.get("target"),
            "work": res.get("work"), "budget_work": res.get("budget_work"),
            "seconds": round(res["seconds"], 2), "folder": str(folder)}
