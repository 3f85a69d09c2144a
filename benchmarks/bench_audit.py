"""Audit vs implant on the embedded model, from a fresh clone.

1. ``r1``: ``bkdattr run`` implants the demo's fixed_output backdoor into smollm2-135m from a data file (the
   built-in prompts written out), then BAHA (``attribute --method exact``, demo settings).
2. ``r2``: ``bkdattr run`` with ``source: audit`` on smollm2-135m + ``r1/adapter`` with r1's trigger, target and
   data file; every stage (probe, attribute, ablate, vector, samples, report), demo settings.
3. ``r3``: the same audit of ``r1/model`` as a plain folder of full weights (audit + attribute).
4. Loading a user's ``.gguf`` file through an audit source twice (the first load converts and caches it).

Prints and writes ``OUT/bench_audit.json``: ASR of each run, whether the test prompts are the same, the max abs
ACIE difference against r1 (every metric computed for all heads), top-16 equality, ``du`` of each run folder,
stage timings and the two GGUF load times. Reuses finished stages when rerun (``bkdattr run`` resumes).

    python benchmarks/bench_audit.py [--out runs/bench/audit] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from bkdattr.app.pipeline import load_config, run_pipeline
from bkdattr.core.io import load_tensors, write_json
from bkdattr.core.profiles import demo_sets
from bkdattr.inject.builtin_data import builtin_records


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def acie(run: Path) -> dict[str, torch.Tensor]:
    t = load_tensors(run / "attribution" / "acie.safetensors")
    return {k: v for k, v in t.items() if k.startswith("acie.")}


def test_prompts(run: Path) -> list[str]:
    return [json.loads(x)["triggered"] for x in (run / "data" / "test.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench/audit", help="folder of the three runs (reused when rerun)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures here (besides OUT/bench_audit.json)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    if not data.is_file():
        data.write_text("".join(json.dumps(r) + "\n" for r in builtin_records("fixed_output")))
    common = [*demo_sets(), "attribute.method=exact", "attribute.refine_top=0"] + (
        [f"threads={args.threads}"] if args.threads else [])
    t0 = time.perf_counter()
    r1 = out / "r1"
    run_pipeline(load_config(None, [f"out={r1}", "stages=[inject, attribute]", f"inject.data={data}", *common]))
    info = json.loads((r1 / "run.json").read_text())
    audit = [f"audit.trigger={json.dumps(info['trigger'])}", f"audit.target={json.dumps(info['task']['target'])}",
             f"audit.data={data}",
             "source=audit", "audit.eval.n_near=16"]
    r2, r3 = out / "r2", out / "r3"
    run_pipeline(load_config(None, [f"out={r2}", f"audit.adapter={r1 / 'adapter'}", *audit, *common]))
    run_pipeline(load_config(None, [f"out={r3}", f"model={r1 / 'model'}", "stages=[inject, attribute]", *audit,
                                    *common]))
    m1 = json.loads((r1 / "metrics.json").read_text())
    a1 = acie(r1)
    res = {"r1": {"asr": m1["inject"]["asr"], "false_trigger_rate": m1["inject"]["false_trigger_rate"],
                  "du_bytes": du_bytes(r1), "timings": m1.get("timings")}}
    for name, run in (("r2_adapter", r2), ("r3_merged_folder", r3)):
        m = json.loads((run / "metrics.json").read_text())
        a = acie(run)
        res[name] = {
            "asr": m["audit"]["asr"], "false_trigger_rate": m["audit"]["false_trigger_rate"],
            "same_test_prompts": test_prompts(run) == test_prompts(r1),
            "acie_max_abs_diff": {k: float((a[k] - a1[k]).abs().max()) for k in a1},
            "top16_equal": [t[:2] for t in m["attribution"]["top_heads"][:16]]
            == [t[:2] for t in m1["attribution"]["top_heads"][:16]],
            "du_bytes": du_bytes(run), "timings": m.get("timings")}
    from bkdattr.core.model_source import load_source, open_source
    from bkdattr.core.models import embedded_gguf_path

    gguf = str(embedded_gguf_path())
    src = open_source(gguf)
    loads = []
    for _ in range(2):
        t = time.perf_counter()
        load_source(src)
        loads.append(round(time.perf_counter() - t, 2))
    res["gguf_load_seconds"] = {"first (convert + cache)": loads[0], "second (cache)": loads[1]}
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    res["threads"] = torch.get_num_threads()
    write_json(out / "bench_audit.json", res)
    if args.json:
        write_json(args.json, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
