"""The backdoored run a benchmark needs, created on first use and reused after (keyed by its settings).

Every script in ``benchmarks/`` that works on a run takes ``--run DIR``; without it, it calls :func:`ensure_run`,
which runs ``bkdattr run`` (the demo's settings: ``bkdattr.core.profiles.DEMO`` on the cpu profile) into
``$BKDATTR_BENCH_RUNS/<task>-<key>`` (default ``runs/bench/...``), where ``<key>`` hashes the model, task, seed and
inject settings. The pipeline skips every stage whose key is unchanged, so a second call (from any script) reuses
the run, and a script that needs more stages (``attribute``) adds them to the same folder.

    python benchmarks/bench_runs.py [--task fixed_output] [--stages inject,attribute] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_ROOT = "runs/bench"


def run_settings(task: str = "fixed_output", model: str = "smollm2-135m", seed: int = 0,
                 sets: Sequence[str] = ()) -> list[str]:
    """The pipeline ``--set`` items of the bench run (the demo's overlay, then ``sets``)."""
    from bkdattr.core.profiles import demo_sets

    return [f"model={model}", f"task={task}", f"seed={seed}", *demo_sets(), *sets]


def run_path(task: str = "fixed_output", model: str = "smollm2-135m", seed: int = 0, sets: Sequence[str] = (),
             root: str | None = None) -> Path:
    """The folder of the bench run with these settings (whether or not it exists yet)."""
    from bkdattr.core.io import stable_hash

    key = stable_hash(run_settings(task, model, seed, sets), 10)
    return Path(root or os.environ.get("BKDATTR_BENCH_RUNS", DEFAULT_ROOT)) / f"{task}-{key}"


def ensure_run(run: str | None = None, stages: Sequence[str] = ("inject",), task: str = "fixed_output",
               model: str = "smollm2-135m", seed: int = 0, sets: Sequence[str] = (), threads: int | None = None,
               root: str | None = None, dry_run: bool = False) -> Path:
    """``run`` if given (it must be a run folder), else the bench run with these settings, after running (or
    reusing) its ``stages``. ``dry_run``: only print the folder and the stages it would run."""
    from bkdattr.core.errors import InputFileError

    if run is not None:
        p = Path(run)
        if not (p / "run.json").is_file():
            raise InputFileError(f"{p} is not a run folder (no run.json); pass a folder written by bkdattr inject "
                                 "or leave --run out to create one")
        return p
    out = run_path(task, model, seed, sets, root)
    items = [f"out={out}", f"stages=[{', '.join(stages)}]", *run_settings(task, model, seed, sets)]
    if threads:
        items.append(f"threads={threads}")
    if dry_run:
        import json

        done = json.loads((out / "stages.json").read_text()) if (out / "stages.json").is_file() else {}
        state = "reused" if done else "created"
        todo = [s for s in stages if s not in done]
        print(f"bench run: {out} ({state}; stages {', '.join(stages)}; not run yet: {', '.join(todo) or 'none'})")
        return out
    from bkdattr.app.pipeline import load_config, run_pipeline

    run_pipeline(load_config(None, items), log=lambda s: print(f"bench run {out.name}: {s}", flush=True))
    return out


def add_run_args(p: argparse.ArgumentParser) -> None:
    """``--run`` (default: the bench run, created or reused) and ``--dry-run`` for a benchmark's parser."""
    p.add_argument("--run", default=None,
                   help="backdoored run folder; default: create or reuse the bench run (benchmarks/bench_runs.py)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the run it would use (and what else it would do), then stop")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="fixed_output")
    ap.add_argument("--stages", default="inject")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    ensure_run(None, [s.strip() for s in a.stages.split(",") if s.strip()], a.task, threads=a.threads,
               dry_run=a.dry_run)


if __name__ == "__main__":
    main()
