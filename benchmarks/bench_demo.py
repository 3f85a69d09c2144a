"""Time the demo pipeline on the embedded model: a fresh run, then a rerun that must reuse every stage.

    python benchmarks/bench_demo.py --out /tmp/demo-bench [--task fixed_output] [--kill-after 120] [--json PATH]

With ``--kill-after S`` the fresh run is SIGKILLed after S seconds and restarted (it must resume and finish).
Prints per-stage seconds from ``metrics.json``, the pipeline wall time and the rerun wall time. The model cache
(``$BKDATTR_CACHE``) is not cleared: time its one-time set-up with benchmarks/bench_load.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def _bkdattr() -> list[str]:
    exe = Path(sys.executable).with_name("bkdattr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bkdattr.app.cli"]


def _run(args: list[str], kill_after: float | None = None) -> tuple[float, int]:
    t0 = time.perf_counter()
    p = subprocess.Popen(_bkdattr() + args, start_new_session=True)
    try:
        rc = p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = -9
    return time.perf_counter() - t0, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bkdattr-demo-bench")
    ap.add_argument("--task", default="fixed_output")
    ap.add_argument("--kill-after", type=float, default=None)
    ap.add_argument("--keep", action="store_true", help="reuse an existing --out instead of starting fresh")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists() and not a.keep:
        shutil.rmtree(out)
    args = ["demo", "--task", a.task, "--out", str(out)]
    res: dict = {"task": a.task}
    if a.kill_after:
        wall, rc = _run(args, a.kill_after)
        res["killed_after_s"] = round(wall, 1)
        print(f"killed after {wall:.1f} s (rc {rc})")
    wall, rc = _run(args)
    if rc != 0:
        print(f"demo failed (rc {rc})")
        return rc
    res["pipeline_wall_s"] = round(wall, 1)
    m = json.loads((out / a.task / "metrics.json").read_text())
    res["stage_seconds"] = m.get("timings", {})
    wall2, rc = _run(args)
    res["rerun_wall_s"] = round(wall2, 1)
    print("\nstage seconds:")
    for k, v in res["stage_seconds"].items():
        print(f"  {k:10s} {v:8.1f}")
    print(f"pipeline wall (fresh{' after kill' if a.kill_after else ''}): {wall:.1f} s; rerun: {wall2:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
