"""benchmarks/gpu_check.sh --dry-run: every step of the one-shot GPU check runs on the CPU with a tiny model and
the JSON has the keys the GPU run fills in (issue 19, "What to build 3")."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # five processes, the tiny pipeline and a gloo pair: ~1 min of CPU
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert out.is_file(), proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert proc.returncode == 0 and r["ok"], json.dumps(r, indent=1)[-3000:]
    assert r["mode"] == "dry-run" and r["env"]["torch"] and r["seconds"] > 0
    assert set(r["steps"]) == {"env", "pytest", "demo", "exact_7b", "nccl"}
    assert all(s["status"] == "ok" for s in r["steps"].values())

    assert "-m cuda --device cpu" in r["steps"]["pytest"]["command"]

    demo = r["steps"]["demo"]
    assert set(demo["stage_seconds"]) == {"inject", "probe", "attribute", "ablate", "vector", "samples", "report"}
    m = json.loads((tmp_path / "work" / "demo" / "metrics.json").read_text())  # the figures of the run it made
    assert demo["device"] == "cpu" and demo["asr"] == m["inject"]["asr"]
    assert demo["top_heads"] == m["attribution"]["top_heads"][:5] and len(demo["top_heads"]) == 5

    ex = r["steps"]["exact_7b"]
    for dtype in ("bfloat16", "float32"):
        d = ex[dtype]
        assert (d["layers"], d["heads"]) == (2, 4) and d["strategy"] == "layers"
        assert d["sweep_first_token_s"] > 0 and d["sweep_peak_gib"] is None  # no GPU: no peak
        assert d["estimate_gib"]["total"] > 0 and d["prompt_tokens"] > d["target_tokens"] > 0
        diffs = d["exact_vs_reference_max_abs_diff"]
        assert set(diffs) == {"first_token_logprob", "geomean_prob", "sum_logprob"}
        assert all(math.isfinite(v) for v in diffs.values())
    assert max(ex["float32"]["exact_vs_reference_max_abs_diff"].values()) < 1e-4  # exact == reference in fp32

    nccl = r["steps"]["nccl"]
    assert nccl["backend"] == "gloo" and nccl["world_size"] == 2
    assert nccl["bit_identical"] and nccl["same_top_heads"]
