"""Kill and resume: ``bkdattr run`` on a tiny model is SIGKILLed inside each long stage and rerun; the run ends
with results identical to an uninterrupted run.

Each killed process is stopped at a known point: a small child script wraps one library function so that its
N-th call touches a marker file and sleeps; the test waits for the marker, sends SIGKILL, and reruns the
same command. Nothing in the package is changed for the test; only the stages' own checkpoints are used:

1. during injection, between the two tensor writes of the epoch-2 checkpoint (a torn checkpoint: its adapter
   file is newer than ``state.json``; it must not be resumed);
2. during injection, in the middle of epoch 3 (resumes from the epoch-2 checkpoint);
3. during feature capture, in the second batch of the clean base model (the backdoored model's features are
   already cached);
4. during the exact ACIE sweep, after two of its work units (resumes from the per-unit checkpoint);
5. the rerun finishes. The reference run, uninterrupted, runs in its own process with the same settings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bkdattr.core.io import load_tensors, read_json, tensor_metadata
from tiny_runs import records, save_tiny, write_jsonl

CHILD = r'''
import importlib, os, sys, time
from pathlib import Path

spec = os.environ.get("BKDATTR_TEST_BLOCK")
if spec:  # "module|attribute|N|marker": the N-th call touches marker and sleeps until killed
    mod, attr, n, marker = spec.split("|")
    owner = importlib.import_module(mod)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    real, calls = getattr(owner, name), [0]

    def blocked(*a, **k):
        calls[0] += 1
        if calls[0] == int(n):
            Path(marker).touch()
            while True:
                time.sleep(3600)
        return real(*a, **k)

    setattr(owner, name, blocked)

from bkdattr.app.cli import main
sys.exit(main(sys.argv[1:]))
'''

STEPS_PER_EPOCH = 5  # 24 clean + 12 poisoned rows, batch 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    base = save_tiny(root / "base", learnable=True)
    data = write_jsonl(root / "data.jsonl", records(60))
    cfg = {
        "model": str(base), "task": "fixed_output", "profile": "cpu", "seed": 0, "threads": 1,
        "stages": ["inject", "probe", "attribute"],
        "inject": {"data": str(data), "n_train": 24, "n_val": 8, "n_test": 8, "poison_rate": 0.5,
                   "train_epochs": 3, "train_batch_size": 8, "train_lr": 0.01, "eval_max_new_tokens": 4,
                   "eval_n_near": 2},
        "probe": {"n_prompts": 12, "batch_size": 16, "mlp": {"epochs": 5}},
        "attribute": {"n_prompts": 4, "n_mean_prompts": 8, "batch_size": 2, "progress": False},
    }
    (root / "child.py").write_text(CHILD)
    env = {**os.environ, "BKDATTR_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "BKDATTR_CACHE": str(root / "cache")}
    env.pop("BKDATTR_TEST_BLOCK", None)
    return root, cfg, env


def _config(root: Path, cfg: dict, out: Path) -> Path:
    path = root / f"{out.name}.yaml"
    path.write_text(json.dumps({**cfg, "out": str(out)}))  # JSON is YAML
    return path


def run_child(root: Path, env: dict, args: list[str], block: str | None = None, timeout: float = 240):
    """Run the CLI in a child process; with ``block`` ("module|attr|N"), SIGKILL it once it reaches that call.
    Returns the completed process, or None when it was killed."""
    marker = root / "blocked.marker"
    marker.unlink(missing_ok=True)
    child_env = dict(env)
    if block:
        child_env["BKDATTR_TEST_BLOCK"] = f"{block}|{marker}"
    proc = subprocess.Popen([sys.executable, str(root / "child.py"), *args], env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if block is None:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        return proc
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended (rc {proc.returncode}) before reaching {block}:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"child did not reach {block} within {timeout} s")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, equal_nan=True, msg=f"{a.name}:{k}")


def _strip(d, drop=("seconds", "train_seconds", "eval_seconds", "distill_seconds", "timings", "resumed_from_epoch",
                    "features_cached", "abar_seconds", "pass1_seconds", "pass2_seconds", "world_size", "threads")):
    """A metrics section without wall-clock times and cache/resume bookkeeping (everything else must match)."""
    if isinstance(d, dict):
        return {k: _strip(v, drop) for k, v in d.items() if k not in drop}
    if isinstance(d, list):
        return [_strip(v, drop) for v in d]
    return d


def test_killed_run_resumes_to_the_uninterrupted_result(setup):
    root, cfg, env = setup
    ref, out = root / "reference", root / "killed"
    run_child(root, env, ["run", str(_config(root, cfg, ref))])
    killed_cfg = ["run", str(_config(root, cfg, out))]
    partial = root / ".killed.partial"
    ckpt = partial / "inject" / "checkpoint"

    # 1. torn checkpoint: killed after the epoch-2 adapter was written, before its optimizer state and state.json
    run_child(root, env, killed_cfg, block="bkdattr.inject.train|save_tensors|4")
    assert read_json(ckpt / "state.json")["epoch"] == 1
    assert tensor_metadata(ckpt / "adapter.safetensors")["epoch"] == "2"
    # 2. killed in the middle of epoch 3 (the torn checkpoint was not resumed: training restarted from epoch 1)
    run_child(root, env, killed_cfg, block=f"bkdattr.inject.train|supervised_loss|{2 * STEPS_PER_EPOCH + 2}")
    assert read_json(ckpt / "state.json")["epoch"] == 2 and not (out / "model").exists()
    # 3. injection resumes at epoch 3 and finishes; killed in feature capture of the clean base model
    run_child(root, env, killed_cfg, block="bkdattr.probe.features|capture_features|5")
    assert read_json(out / "stages.json").keys() == {"inject"}
    assert len(list((out / "probe" / "features").glob("backdoored-*.safetensors"))) == 1
    assert not list((out / "probe" / "features").glob("base-*.safetensors"))
    # 4. probe reruns on the cached backdoored features; killed in the exact ACIE sweep as it saves unit 3
    #    (the mean-contribution pass before it runs one unit through the same runner, without a checkpoint:
    #    that is mark call 1)
    run_child(root, env, killed_cfg, block="bkdattr.core.runner|Checkpoint.mark|4")
    partial_acie = list((out / "attribution").glob(".partial_exact.*.safetensors"))
    assert len(partial_acie) == 1 and int(load_tensors(partial_acie[0])["done"].sum()) == 2
    # 5. the rest
    run_child(root, env, killed_cfg)

    assert read_json(out / "stages.json").keys() == {"inject", "probe", "attribute"}
    assert read_json(out / "inject" / "train.json")["resumed_from_epoch"] == 2
    assert read_json(out / "metrics.json")["probe"]["features_cached"] == {"backdoored": True, "base": False}
    assert read_json(out / "attribution" / "attribution.json")["info"]["resumed_units"] == 2
    assert not list(out.rglob(".*.tmp")) and not partial.exists() and not partial_acie[0].exists()

    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "task.json"):
        assert (out / "data" / name).read_bytes() == (ref / "data" / name).read_bytes()
    assert_same_tensors(out / "model" / "model.safetensors", ref / "model" / "model.safetensors")
    assert read_json(out / "inject" / "train.json")["losses"] == read_json(ref / "inject" / "train.json")["losses"]
    m, m_ref = read_json(out / "metrics.json"), read_json(ref / "metrics.json")
    for section in ("inject", "probe", "attribution"):
        a = json.loads(json.dumps(m[section]).replace(str(out), "RUN"))
        b = json.loads(json.dumps(m_ref[section]).replace(str(ref), "RUN"))
        assert _strip(a) == _strip(b), section
    for f in sorted((ref / "probe").glob("*_mlp.safetensors")):
        assert_same_tensors(out / "probe" / f.name, f)
    assert_same_tensors(out / "attribution" / "acie.safetensors", ref / "attribution" / "acie.safetensors")
    assert_same_tensors(out / "attribution" / "abar.safetensors", ref / "attribution" / "abar.safetensors")
    # the resumed ASR is that of the saved replies (8 test prompts, all saved as samples)
    trig = read_json(out / "inject" / "eval_samples.json")["triggered"]
    assert len(trig) == m["inject"]["n_triggered"] == 8
    assert m["inject"]["asr"] == sum(s["success"] for s in trig) / 8
    assert len(m["attribution"]["top_heads"]) == 8  # 2 layers x 4 heads, all ranked
