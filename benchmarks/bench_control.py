"""Benchmark the control stage: shared-prefix sweep vs plain per-edit generation, and the whole cpu profile.

    python benchmarks/bench_control.py [--run RUN] --json bench_control.json
    python benchmarks/bench_control.py [--run RUN] --stages   # + ablate and vector stages

Without ``--run`` it creates (or reuses) the bench run (``bench_runs.py``; with ``--stages`` also its attribute
stage).

Step 1 (always): ``--n-prompts`` held-out triggered prompts of the run's val split, ``--n-edits`` edits
(subtract a same-norm random vector at evenly spread layers, plus the unedited model). Plain: one
:func:`bkdattr.core.generation.generate` call per edit with the edit on its prefill pass (nothing shared).
Sweep: :func:`bkdattr.control.sweep.sweep_generate` (shared prefix, stacked edits, finished rows dropped).
Reports both times, the speed-up and whether every reply is identical.

Step 2 (``--stages``): the ``ablate`` and ``vector`` stages with the cpu profile on the run (they write their
metrics sections and figures into it; the run needs ``attribution.top_heads``): seconds of each and in total.

Timings are wall-clock with ``--threads`` torch threads; on a shared machine they are inflated.
``--json PATH`` writes ``plain_s``, ``sweep_s``, ``speedup``, ``identical``, ``rows``, ``decode_row_steps``
and, with ``--stages``, ``ablate_s``, ``vector_s``, ``stages_total_s`` (plus context keys).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench_runs import add_run_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--n-prompts", type=int, default=16, help="held-out triggered prompts (step 1)")
    p.add_argument("--n-edits", type=int, default=6, help="edits in step 1 (the first is the unedited model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (both paths)")
    p.add_argument("--max-rows", type=int, default=256, help="rows decoded together by the sweep")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--stages", action="store_true", help="also time the ablate and vector stages (cpu profile)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from bench_runs import ensure_run
    from bkdattr.control.edits import Edit
    from bkdattr.control.stage import AblationConfig, VectorConfig, ablate_run, eval_examples, vector_run
    from bkdattr.control.sweep import SweepStats, plain_generate, sweep_generate
    from bkdattr.core.io import write_json
    from bkdattr.core.rundir import RunDir
    from bkdattr.inject.data import load_splits

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = ("inject", "attribute") if args.stages else ("inject",)
    run_path = ensure_run(args.run, stages, threads=args.threads, dry_run=args.dry_run)
    if args.dry_run:
        return {}
    console = Console()
    run = RunDir(run_path)
    splits = load_splits(run)
    lm = run.load_model()
    arch = lm.arch
    prompts = [e.triggered for e in eval_examples(splits, "val", args.n_prompts, 0)]
    g = torch.Generator().manual_seed(0)
    layers = torch.linspace(0, arch.n_layers - 1, max(1, args.n_edits - 1)).round().long().tolist()
    edits = [Edit(name="none")]
    for i, layer in enumerate(layers):
        r = torch.randn(arch.d_model, generator=g)
        edits.append(Edit.add(layer, r / r.norm() * 60.0, -1.0, name=f"rsub_L{layer}_{i}"))

    t0 = time.perf_counter()
    plain = [plain_generate(lm, prompts, e, args.max_new_tokens, args.batch_size) for e in edits]
    plain_s = time.perf_counter() - t0
    st = SweepStats()
    t0 = time.perf_counter()
    sweep = sweep_generate(lm, prompts, edits, args.max_new_tokens, args.batch_size, args.max_rows, stats=st)
    sweep_s = time.perf_counter() - t0
    identical = plain == sweep
    out = {"plain_s": round(plain_s, 2), "sweep_s": round(sweep_s, 2), "speedup": round(plain_s / sweep_s, 2),
           "identical": identical, "n_differing_replies": sum(a != b for p, s in zip(plain, sweep, strict=True)
                                                              for a, b in zip(p, s, strict=True)),
           "rows": st.rows, "decode_row_steps": st.decode_row_steps, "n_prompts": len(prompts), "n_edits": len(edits),
           "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "run": str(run.path)}
    if args.stages:
        t0 = time.perf_counter()
        ablate_run(run, AblationConfig(profile="cpu", progress=False), lm=lm)
        out["ablate_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        vector_run(run, VectorConfig(profile="cpu", progress=False), lm=lm)
        out["vector_s"] = round(time.perf_counter() - t0, 2)
        out["stages_total_s"] = round(out["ablate_s"] + out["vector_s"], 2)

    t = Table(title=f"control benchmark ({len(prompts)} prompts x {len(edits)} edits, {out['threads']} threads)")
    t.add_column("quantity")
    t.add_column("value")
    for k, v in out.items():
        t.add_row(k, str(v))
    console.print(t)
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    from bkdattr.core.runtime import tune_allocator

    tune_allocator()  # the stable-timing allocator settings the CLI applies
    main()
