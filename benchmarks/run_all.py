"""Run every benchmark (``make bench``): one JSON per script under ``--out`` (default ``benchmarks/results/``).

    python benchmarks/run_all.py [--out benchmarks/results] [--only bench_peers,bench_load] [--dry-run]

Each script runs in its own process from the repository root; a script that needs a backdoored run creates (or
reuses) the bench run (``bench_runs.py``), so this works from a fresh clone with no earlier run. A failing script
is recorded and the next one runs; ``OUT/summary.json`` lists each script's exit status, seconds and JSON file, and
the exit status is 1 when any failed. The whole set takes well over an hour on 2 CPU cores (the demo, the audit
and the data-file benchmarks each train a backdoor). ``--dry-run`` runs each script's cheapest mode instead
(``--dry-run``, ``--tiny``, ``--synthetic``, ``write`` or ``--help``): a check of the wiring in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def plan(out: Path, dry: bool) -> list[tuple[str, list[str], bool]]:
    """``(name, command, writes_json)`` per benchmark, in the order they run (cheap ones first)."""
    py = [sys.executable]

    def j(name: str) -> list[str]:
        return ["--json", str(out / f"{name}.json")]

    def s(name: str) -> list[str]:
        return [*py, str(HERE / f"{name}.py")]

    gpu_check = ["bash", str(HERE / "gpu_check.sh"), "--out", str(out / "gpu_check.json")]
    if dry:
        return [
            ("bench_load", [*s("bench_load"), "--help"], False),
            ("bench_inject", [*s("bench_inject"), "--tiny", "--steps", "1", *j("bench_inject")], True),
            ("bench_probe", [*s("bench_probe"), "--synthetic", "--loop-epochs", "1", *j("bench_probe")], True),
            ("bench_probe_stage", [*s("bench_probe"), "--dry-run"], False),
            ("bench_attribution", [*s("bench_attribution"), "--dry-run"], False),
            ("bench_peers", [*s("bench_peers"), "--dry-run"], False),
            ("bench_dtype", [*s("bench_dtype"), "--dry-run"], False),
            ("bench_memory", [*s("bench_memory"), "--dry-run", *j("bench_memory")], True),
            ("bench_control", [*s("bench_control"), "--stages", "--dry-run"], False),
            ("bench_data_files", [*s("bench_data_files"), "write", "--out", str(out / "data_files"),
                                  *j("bench_data_files")], True),
            ("bench_audit", [*s("bench_audit"), "--help"], False),
            ("bench_disarm", [*s("bench_disarm"), "--dry-run"], False),
            ("bench_scan", [*s("bench_scan"), "--dry-run"], False),
            ("bench_demo", [*s("bench_demo"), "--help"], False),
            ("gpu_check", [*gpu_check, "--dry-run", "--skip", "pytest", "--skip", "nccl"], True),
        ]
    cuda = _has_cuda()
    return [
        ("bench_load", [*s("bench_load"), *j("bench_load")], True),
        ("bench_inject", [*s("bench_inject"), *j("bench_inject")], True),
        ("bench_probe", [*s("bench_probe"), *j("bench_probe")], True),
        ("bench_attribution", [*s("bench_attribution"), *j("bench_attribution")], True),
        ("bench_peers", [*s("bench_peers"), *j("bench_peers")], True),
        ("bench_dtype", [*s("bench_dtype"), *j("bench_dtype")], True),
        ("bench_memory", [*s("bench_memory"), *j("bench_memory")], True),
        ("bench_control", [*s("bench_control"), "--stages", *j("bench_control")], True),
        ("bench_data_files", [*s("bench_data_files"), "paper", "--out", "runs/bench/data_files",
                              *j("bench_data_files")], True),
        ("bench_audit", [*s("bench_audit"), "--out", "runs/bench/audit", *j("bench_audit")], True),
        ("bench_demo", [*s("bench_demo"), "--out", "runs/bench/demo", *j("bench_demo")], True),
        ("bench_disarm", [*s("bench_disarm"), *j("bench_disarm")], True),
        ("bench_scan", [*s("bench_scan"), *j("bench_scan")], True),
        ("gpu_check", gpu_check if cuda else [*gpu_check, "--dry-run"], True),
    ]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of the JSON files")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="each script's cheapest mode (a wiring check)")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(out, a.dry_run)
    if a.only:
        names = {x.strip() for x in a.only.split(",") if x.strip()}
        unknown = names - {n for n, _, _ in steps}
        if unknown:
            print(f"error: unknown benchmark(s) {sorted(unknown)}; choose from {[n for n, _, _ in steps]}")
            return 2
        steps = [st for st in steps if st[0] in names]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    summary: dict = {"dry_run": a.dry_run, "benchmarks": {}}
    for name, cmd, writes in steps:
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        rec = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
        if writes:
            rec["json"] = str(out / f"{name}.json")
            rec["json_written"] = (out / f"{name}.json").is_file()
        summary["benchmarks"][name] = rec
        print(f"== {name}: exit {rc} in {rec['seconds']} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    failed = [n for n, r in summary["benchmarks"].items() if r["rc"] != 0]
    print(f"{len(steps) - len(failed)} of {len(steps)} benchmarks finished; failed: {failed or 'none'}; "
          f"results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
