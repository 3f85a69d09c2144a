"""Benchmark the probe stage.

Two modes:

* ``--synthetic`` (no model): the probe-fitting hot path at the cpu profile's shape -- 30 layers x 576 features,
  120/40/40 prompts (240/80/80 rows) -- timing batched MLP training (all 30 layers at once, 100 epochs),
  a loop of 30 single-layer MLP trainings for comparison (``--loop-epochs`` epochs each, scaled to 100), SVM
  fitting and both ICLA matrices.
* ``--run RUN`` (default): the whole stage on a run folder (features for the backdoored and the clean base
  model, four probe settings, ICLA, figures). ``--fresh`` deletes the feature cache first so capture is timed;
  ``--no-near-trigger`` times the backdoored model and the clean control only.

Usage: ``python benchmarks/bench_probe.py [--run RUN] [--fresh] [--threads 2] [--synthetic] [--json PATH]``.
Without ``--run`` the stage mode creates (or reuses) the bench run (``bench_runs.py``). Prints one JSON object
(``--json``: also writes it). Timings on a shared machine are inflated by other processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def synthetic(loop_epochs: int) -> dict:
    from bkdattr.probe.icla import icla_matrix
    from bkdattr.probe.probes import MLPProbeConfig, train_mlp_probes, train_svm_probes

    g = torch.Generator().manual_seed(0)
    n_layers, d = 30, 576

    def rows(n: int):
        y = np.arange(n) % 2
        x = torch.randn(n, n_layers, d, generator=g)
        x[:, :, :8] += 0.5 * torch.as_tensor(2 * y - 1, dtype=torch.float32)[:, None, None]
        return x, y

    (xt, yt), (xv, yv), (xs, ys) = rows(240), rows(80), rows(80)
    out: dict = {}
    t = time.perf_counter()
    mlp = train_mlp_probes(xt, yt, xv, yv, MLPProbeConfig())
    out["mlp_batched_30_layers_100_epochs_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for layer in range(n_layers):
        train_mlp_probes(xt[:, [layer]], yt, xv[:, [layer]], yv, MLPProbeConfig(epochs=loop_epochs), [layer])
    out["mlp_loop_30_layers_100_epochs_s_extrapolated"] = (time.perf_counter() - t) * 100 / loop_epochs
    t = time.perf_counter()
    svm = train_svm_probes(xt, yt)
    out["svm_fit_30_layers_s"] = time.perf_counter() - t
    t = time.perf_counter()
    icla_matrix(mlp, xs, ys)
    out["icla_mlp_s"] = time.perf_counter() - t
    t = time.perf_counter()
    icla_matrix(svm, xs, ys)
    out["icla_svm_s"] = time.perf_counter() - t
    return {k: round(v, 3) for k, v in out.items()}


def stage(run: str, fresh: bool, near: bool, n_prompts: int) -> dict:
    from bkdattr.probe.stage import ProbeStageConfig, run_probe_stage

    if fresh:
        shutil.rmtree(Path(run) / "probe" / "features", ignore_errors=True)
    t = time.perf_counter()
    m = run_probe_stage(run, ProbeStageConfig(n_prompts=n_prompts, near_trigger=near))
    wall = time.perf_counter() - t
    return {"wall_s": round(wall, 2), "timings": m["timings"], "features_cached": m["features_cached"],
            "mean_accuracy": m["summary"]}


def main() -> None:
    from bench_runs import add_run_args, ensure_run

    ap = argparse.ArgumentParser()
    add_run_args(ap)
    ap.add_argument("--fresh", action="store_true", help="delete the feature cache first")
    ap.add_argument("--no-near-trigger", action="store_true")
    ap.add_argument("--n-prompts", type=int, default=200)
    ap.add_argument("--synthetic", action="store_true", help="probe fitting only, on random features")
    ap.add_argument("--loop-epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads}
    if args.synthetic:
        res["synthetic"] = synthetic(args.loop_epochs)
    else:
        run = ensure_run(args.run, ("inject",), threads=args.threads, dry_run=args.dry_run)
        if args.dry_run:
            return
        res["stage"] = stage(str(run), args.fresh, not args.no_near_trigger, args.n_prompts)
    print(json.dumps(res, indent=2))
    if args.json:
        from bkdattr.core.io import write_json

        write_json(args.json, res)


if __name__ == "__main__":
    from bkdattr.core.runtime import tune_allocator

    tune_allocator()  # the stable-timing allocator settings the CLI applies
    main()
