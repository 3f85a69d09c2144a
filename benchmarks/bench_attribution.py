"""Benchmark BAHA on a backdoored run: reference vs exact on a subset of heads, exact and attribution on all.

    python benchmarks/bench_attribution.py [--run RUN] --json bench_attribution.json

Without ``--run`` it creates (or reuses) the bench run: the demo's fixed_output implant (``bench_runs.py``).

Steps (same prompts, same ``abar`` for every method; the data selection is the ``attribute`` stage's):

1. ``reference`` (one full forward pass per head) and ``exact`` on the heads of ``--ref-layers`` (a few layers
   spread over the depth, so the per-head cost of ``exact``, which depends on the layer, is representative):
   seconds per head, their ratio, and the max |exact - reference| over every per-prompt CIE and metric;
2. ``exact`` on all heads (every metric): the full-sweep time; ``exact`` with the first-token score alone
   (one scored position per head); the two-pass sweep of the ``cpu`` profile (first-token score on all heads,
   then every metric on the top ``--refine-top`` heads of that ranking);
3. ``attribution`` (first-order) on all heads: time, ratio to the exact sweep, Spearman correlation and
   top-8 / top-16 overlap with exact ACIE (ranking metric ``--metric``); again with the first-token score alone;
4. the arithmetic (``attribution_work.py``): the MACs each run performs, counted from the model's shapes on the
   same padded batches, a measured matmul rate, and from them the work ratio of each pair of methods (a
   ceiling for their speed ratio at equal efficiency, the same on any hardware) and the shortest time the work
   can take here.

Timings are wall-clock on this machine with ``--threads`` torch threads; on a shared machine they are inflated.
``--json PATH`` writes the figures with the keys ``reference_s_per_head``, ``exact_s_per_head``,
``ratio_exact_vs_reference``, ``max_abs_diff``, ``exact_full_sweep_s``, ``attribution_s``,
``ratio_attribution_vs_exact``, ``spearman``, ``top8_overlap``, ``top16_overlap``, plus
``exact_full_sweep_first_token_s`` (all heads, first-token score only), ``exact_two_pass_s`` (the ``cpu``
profile default), ``attribution_first_token_s``, the ``work_*`` figures of step 4 and context keys.
``exact_full_sweep_s``, ``attribution_s`` and the per-head figures cover all three metrics.
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
    p.add_argument("--n-prompts", type=int, default=32, help="clean attribution prompts")
    p.add_argument("--n-mean-prompts", type=int, default=256, help="triggered prompts for abar (0 = all)")
    p.add_argument("--ref-layers", default="0,10,20,29", help="layers whose heads reference and exact both run")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per chunk")
    p.add_argument("--metric", default="first_token_logprob", help="ranking metric for the agreement figures")
    p.add_argument("--refine-top", type=int, default=32, help="heads refined with every metric in the two-pass sweep")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-reference", action="store_true", help="skip step 1 (no reference timing)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from bench_runs import ensure_run
    from bkdattr.attribution import agreement, attribute, mean_contributions
    from bkdattr.attribution.scores import METRICS
    from bkdattr.attribution.stage import AttributeConfig, select_examples
    from bkdattr.core.io import write_json
    from bkdattr.core.rundir import RunDir
    from bkdattr.inject.data import load_splits

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_path = ensure_run(args.run, ("inject",), threads=args.threads, dry_run=args.dry_run)
    if args.dry_run:
        return {}
    console = Console()
    run = RunDir(run_path)
    cfg = AttributeConfig(n_prompts=args.n_prompts, n_mean_prompts=args.n_mean_prompts, batch_size=args.batch_size,
                          metric=args.metric)
    clean, mean_ex = select_examples(load_splits(run), cfg)
    prompts, targets = [e.prompt for e in clean], [e.backdoor_output for e in clean]
    lm = run.load_model()
    t0 = time.perf_counter()
    abar = mean_contributions(lm, [e.triggered for e in mean_ex], progress=True)
    abar_s = time.perf_counter() - t0
    kw = dict(batch_size=args.batch_size, metric=args.metric, progress=True)
    out: dict = {"run": str(run.path), "n_prompts": len(prompts), "n_mean_prompts": len(mean_ex),
                 "n_heads": lm.arch.n_total_heads, "threads": torch.get_num_threads(), "abar_s": round(abar_s, 2),
                 "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                 "load_average_start": os.getloadavg()[0]}

    if not args.skip_reference:
        layers = [int(x) for x in args.ref_layers.split(",") if x.strip()]
        subset = [(x, h) for x in layers for h in range(lm.arch.n_heads)]
        ref = attribute(lm, prompts, targets, abar, method="reference", heads=subset, **kw)
        ex_sub = attribute(lm, prompts, targets, abar, method="exact", heads=subset, **kw)
        diff = max(float((ex_sub.cie[m][:, ex_sub.evaluated] - ref.cie[m][:, ref.evaluated]).abs().max())
                   for m in METRICS)
        diff_acie = max(float((ex_sub.acie[m] - ref.acie[m])[ref.evaluated].abs().max()) for m in METRICS)
        ex_sub1 = attribute(lm, prompts, targets, abar, method="exact", heads=subset, metrics=["first_token_logprob"],
                            **{**kw, "metric": "first_token_logprob"})
        out.update(exact_first_token_s_per_head=ex_sub1.seconds / len(subset),
                   ratio_exact_first_token_vs_reference=ref.seconds / ex_sub1.seconds)
        out.update(ref_layers=layers, reference_s_per_head=ref.seconds / len(subset),
                   exact_s_per_head=ex_sub.seconds / len(subset),
                   ratio_exact_vs_reference=ref.seconds / ex_sub.seconds, max_abs_diff=diff,
                   max_abs_diff_acie=diff_acie, exact_strategy=ex_sub.info.get("strategy"))

    ex = attribute(lm, prompts, targets, abar, method="exact", **kw)
    ex_first = attribute(lm, prompts, targets, abar, method="exact", metrics=["first_token_logprob"],
                         **{**kw, "metric": "first_token_logprob"})
    two = attribute(lm, prompts, targets, abar, method="exact", refine_top=args.refine_top,
                    **{**kw, "metric": "first_token_logprob"})
    est = attribute(lm, prompts, targets, abar, method="attribution", **kw)
    est1 = attribute(lm, prompts, targets, abar, method="attribution", metrics=["first_token_logprob"],
                     **{**kw, "metric": "first_token_logprob"})
    g = "geomean_prob"
    full_top8 = {(x, h) for x, h, _ in ex.top_heads(8, g)}
    out.update(exact_two_pass_s=two.seconds, two_pass_refine_top=args.refine_top,
               two_pass_pass1_s=two.info.get("pass1_seconds"), two_pass_pass2_s=two.info.get("pass2_seconds"),
               two_pass_geomean_top8_recall=len(full_top8 & {(x, h) for x, h, _ in two.top_heads(8, g)}) / 8,
               two_pass_max_abs_diff_vs_full={m: float((two.cie[m] - ex.cie[m])[~torch.isnan(two.cie[m])].abs().max())
                                              for m in METRICS},
               two_pass_rank_agreement=two.info.get("refine_rank_agreement"))
    ag = agreement(est, ex, args.metric)
    diff_first = float((ex_first.cie["first_token_logprob"] - ex.cie["first_token_logprob"]).abs().max())
    out.update(exact_full_sweep_s=ex.seconds, exact_full_sweep_s_per_head=ex.seconds / lm.arch.n_total_heads,
               exact_first_token_sweep_s=ex_first.seconds,
               exact_full_sweep_first_token_s=ex_first.seconds, first_token_mode_max_abs_diff=diff_first,
               attribution_s=est.seconds, ratio_attribution_vs_exact=ex.seconds / est.seconds,
               attribution_first_token_s=est1.seconds,
               ratio_attribution_vs_exact_first_token=ex_first.seconds / est1.seconds,
               attribution_first_token_vs_all_max_abs_diff=float(
                   (est1.cie["first_token_logprob"] - est.cie["first_token_logprob"]).abs().max()),
               spearman=ag["spearman"], top8_overlap=ag["top8_overlap"], top16_overlap=ag["top16_overlap"],
               agreement_metric=args.metric,
               agreement_by_metric={m: agreement(est, ex, m) for m in METRICS},
               exact_top8={m: [list(t) for t in ex.top_heads(8, m)] for m in METRICS},
               attribution_top8=[list(t) for t in est.top_heads(8)],
               clean_mean={m: float(v.mean()) for m, v in ex.clean.items()},
               load_average_end=os.getloadavg()[0])

    if "reference_s_per_head" in out:  # the per-chunk set-up spread over all heads instead of the subset's
        out["ratio_exact_full_sweep_vs_reference"] = out["reference_s_per_head"] / out["exact_full_sweep_s_per_head"]
    out.update(work_figures(lm, prompts, targets, args, out))

    t = Table(title=f"bench_attribution: {run.path.name}, {len(prompts)} prompts, {lm.arch.n_total_heads} heads, "
                    f"{out['threads']} thread(s)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    n_h, top = lm.arch.n_total_heads, args.refine_top
    rows = [("reference s/head (all 3 metrics)", "reference_s_per_head", "{:.3f}"),
            ("exact s/head (same heads, all 3 metrics)", "exact_s_per_head", "{:.3f}"),
            ("exact vs reference speed-up (all 3 metrics)", "ratio_exact_vs_reference", "{:.1f}x"),
            ("exact full sweep s/head vs reference s/head (all 3 metrics)", "ratio_exact_full_sweep_vs_reference",
             "{:.1f}x"),
            ("exact s/head (same heads, first-token only)", "exact_first_token_s_per_head", "{:.3f}"),
            ("exact first-token vs reference (all 3) speed-up", "ratio_exact_first_token_vs_reference", "{:.1f}x"),
            ("max |exact - reference| (per-prompt CIE, all 3 metrics)", "max_abs_diff", "{:.2e}"),
            (f"exact full sweep s: all 3 metrics x {n_h} heads (paper profile)", "exact_full_sweep_s", "{:.1f}"),
            (f"exact full sweep s: first-token only x {n_h} heads", "exact_full_sweep_first_token_s", "{:.1f}"),
            (f"exact two-pass s: first-token x {n_h} + all 3 x top {top} (cpu default)", "exact_two_pass_s",
             "{:.1f}"),
            (f"two-pass geomean top-8 found among the first-token top {top}", "two_pass_geomean_top8_recall",
             "{:.3f}"),
            ("attribution s (first-order, all 3 metrics, all heads)", "attribution_s", "{:.2f}"),
            ("attribution vs exact full sweep (all 3 metrics) speed-up", "ratio_attribution_vs_exact", "{:.1f}x"),
            (f"Spearman (attribution vs exact, {args.metric})", "spearman", "{:.3f}"),
            ("top-8 overlap", "top8_overlap", "{:.3f}"), ("top-16 overlap", "top16_overlap", "{:.3f}"),
            ("attribution s (first-token only)", "attribution_first_token_s", "{:.2f}"),
            ("attribution vs exact speed-up (both first-token only)", "ratio_attribution_vs_exact_first_token",
             "{:.1f}x"),
            ("measured matmul rate, GMAC/s", "work_matmul_gmacs", "{:.1f}"),
            ("work ratio reference / exact per head (all 3 metrics)", "work_ratio_reference_vs_exact", "{:.2f}x"),
            ("work ratio reference / exact per head (first-token)", "work_ratio_reference_vs_exact_first_token",
             "{:.2f}x"),
            ("work ratio exact / attribution (all 3 metrics)", "work_ratio_exact_vs_attribution", "{:.2f}x"),
            ("work ratio exact / attribution (first-token)", "work_ratio_exact_vs_attribution_first_token",
             "{:.2f}x"),
            (f"shortest exact full sweep s at that rate: all 3 metrics x {n_h} heads", "work_floor_exact_full_sweep_s",
             "{:.1f}"),
            (f"shortest exact full sweep s at that rate: first-token x {n_h} heads",
             "work_floor_exact_first_token_sweep_s", "{:.1f}")]
    for label, key, fmt in rows:
        if key in out:
            t.add_row(label, fmt.format(out[key]))
    console.print(t)
    console.print(f"exact top-8 ({args.metric}): {out['exact_top8'][args.metric]}")
    console.print(f"two-pass: pass 1 {out['two_pass_pass1_s']} s, pass 2 {out['two_pass_pass2_s']} s; Spearman of each "
                  f"metric with first-token ACIE over the top {top}: {out['two_pass_rank_agreement']}; max |two-pass "
                  f"- full| per metric: {out['two_pass_max_abs_diff_vs_full']}")
    console.print(f"load average: {out['load_average_start']:.1f} at start, {out['load_average_end']:.1f} at end")
    if args.json:
        write_json(args.json, out)
    return out


def work_figures(lm, prompts, targets, args, out: dict) -> dict:
    """Step 4: counted work, work ratios and the shortest times at a measured matmul rate (see
    ``attribution_work.py``)."""
    from attribution_work import count, matmul_rate
    from bkdattr.attribution.baha import all_heads

    every = count(lm, prompts, targets, all_heads(lm.arch), args.batch_size)
    d_out, d_in = max((p.shape for p in lm.arch.layers[0].parameters() if p.dim() == 2), key=lambda s: s[0] * s[1])
    rate = matmul_rate(int(d_in), int(d_out))
    res = {"work_gmac": {k: round(v / 1e9, 1) for k, v in every.items()}, "work_matmul_gmacs": rate,
           "work_matmul_shape": [512, int(d_in), int(d_out)],
           "work_ratio_exact_vs_attribution": every["exact"] / every["attribution"],
           "work_ratio_exact_vs_attribution_first_token":
               every["exact_first_token"] / every["attribution_first_token"],
           "work_floor_exact_full_sweep_s": every["exact"] / 1e9 / rate,
           "work_floor_exact_first_token_sweep_s": every["exact_first_token"] / 1e9 / rate,
           "work_achieved_gmacs": {"exact_full_sweep": every["exact"] / 1e9 / out["exact_full_sweep_s"],
                                   "exact_first_token_sweep": every["exact_first_token"] / 1e9
                                   / out["exact_full_sweep_first_token_s"]}}
    if "ref_layers" in out:
        layers = out["ref_layers"]
        sub = count(lm, prompts, targets, [(x, h) for x in layers for h in range(lm.arch.n_heads)], args.batch_size)
        none = count(lm, prompts, targets, [], args.batch_size)  # the once-per-chunk work alone
        per_head = {k: sub[k] - none[k] for k in sub}
        res.update(work_ratio_reference_vs_exact=per_head["reference"] / per_head["exact"],
                   work_ratio_reference_vs_exact_first_token=per_head["reference"] / per_head["exact_first_token"])
        res["work_achieved_gmacs"]["reference"] = sub["reference"] / 1e9 / (out["reference_s_per_head"]
                                                                             * len(layers) * lm.arch.n_heads)
    return res


if __name__ == "__main__":
    from bkdattr.core.runtime import tune_allocator

    tune_allocator()  # the stable-timing allocator settings the CLI applies
    main()
