"""How much bfloat16 moves the exact BAHA numbers: the same sweep in float32 and in bfloat16 on a backdoored run.

    python benchmarks/bench_dtype.py [--run RUN] [--n-prompts 16] [--device cpu] [--json out.json]

Without ``--run`` it creates (or reuses) the bench run: the demo's fixed_output implant (``bench_runs.py``).

The attribute stage's own prompt selection (``select_examples``) and one ``abar`` (float32, from the float32
model) feed an exact sweep over every head with the first-token score, once with the model in float32 and once in
bfloat16; then ``exact`` vs ``reference`` on a few heads in each dtype. Printed (and in ``--json``):

* ``acie_max_abs_diff`` / ``acie_median_abs_diff``: |ACIE_bf16 - ACIE_fp32| over the heads (nats, first token);
* ``acie_fp32_abs_median``: the median |ACIE| in float32 (the size of a typical head's effect, for scale);
* ``spearman``, ``top8_overlap``, ``top16_overlap``: agreement of the two rankings;
* ``exact_vs_reference_{float32,bfloat16}``: max |CIE_exact - CIE_reference| per prompt on the few heads;
* ``seconds_{float32,bfloat16}``: the sweep times (CPU timings on a shared machine are inflated).

docs/METHOD.md (section 3, *Dtype*) quotes these figures for the ``--dtype float32`` advice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench_runs import add_run_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--n-prompts", type=int, default=16, help="clean attribution prompts")
    p.add_argument("--n-mean-prompts", type=int, default=64, help="triggered prompts for abar")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(argv: list[str] | None = None) -> dict:
    from bench_runs import ensure_run
    from bkdattr.attribution.baha import attribute
    from bkdattr.attribution.means import mean_contributions
    from bkdattr.attribution.stage import AttributeConfig, select_examples
    from bkdattr.core.rundir import RunDir
    from bkdattr.core.runtime import set_threads
    from bkdattr.inject.data import load_splits

    args = parse_args(argv)
    set_threads(args.threads)
    run_path = ensure_run(args.run, ("inject",), threads=args.threads, dry_run=args.dry_run)
    if args.dry_run:
        return {}
    run = RunDir(run_path)
    cfg = AttributeConfig(n_prompts=args.n_prompts, n_mean_prompts=args.n_mean_prompts)
    clean, mean_ex = select_examples(load_splits(run), cfg)
    prompts, targets = [e.prompt for e in clean], [e.backdoor_output for e in clean]
    out: dict = {"run": str(run_path), "n_prompts": len(prompts), "n_mean_prompts": len(mean_ex), "device": args.device,
                 "metric": "first_token_logprob"}
    acie, lm32 = {}, run.load_model(device=args.device, dtype="float32")
    abar = mean_contributions(lm32, [e.triggered for e in mean_ex], batch_size=16)
    few = [(lm32.arch.n_layers - 1, 0), (lm32.arch.n_layers // 2, 1), (1, 2)]
    del lm32
    for name in ("float32", "bfloat16"):
        lm = run.load_model(device=args.device, dtype=name)
        t0 = time.perf_counter()
        res = attribute(lm, prompts, targets, abar, "exact", "first_token_logprob", metrics=["first_token_logprob"],
                        progress=False)
        out[f"seconds_{name}"] = round(time.perf_counter() - t0, 2)
        out[f"check_max_abs_diff_{name}"] = res.info.get("check_max_abs_diff")
        acie[name] = res.acie["first_token_logprob"].flatten()
        ex = attribute(lm, prompts[:8], targets[:8], abar, "exact", "first_token_logprob", few, progress=False)
        ref = attribute(lm, prompts[:8], targets[:8], abar, "reference", "first_token_logprob", few, progress=False)
        idx = torch.tensor([layer * lm.arch.n_heads + h for layer, h in few])
        m = "first_token_logprob"
        out[f"exact_vs_reference_{name}"] = float((ex.cie[m].flatten(1)[:, idx] - ref.cie[m].flatten(1)[:, idx])
                                                  .abs().max())
        del lm
    d = (acie["bfloat16"] - acie["float32"]).abs()
    k8, k16 = min(8, d.numel()), min(16, d.numel())
    top = {k: set(v.topk(k16).indices.tolist()) for k, v in acie.items()}
    top8 = {k: set(v.topk(k8).indices.tolist()) for k, v in acie.items()}
    out.update(acie_max_abs_diff=float(d.max()), acie_median_abs_diff=float(d.median()),
               acie_fp32_abs_median=float(acie["float32"].abs().median()),
               acie_fp32_max=float(acie["float32"].max()),
               spearman=_spearman(acie["bfloat16"], acie["float32"]),
               top8_overlap=len(top8["float32"] & top8["bfloat16"]) / k8,
               top16_overlap=len(top["float32"] & top["bfloat16"]) / k16)
    print(json.dumps(out, indent=1))
    if args.json:
        from bkdattr.core.io import write_json

        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
