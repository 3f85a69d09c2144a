"""Determinism on CPU: the same config and seed give identical data splits, backdoored weights, ASR, probes and
ACIE (bit for bit); another seed gives other splits, so the comparison is not vacuous."""

from __future__ import annotations

import json

import pytest
import torch

from bkdattr.app.pipeline import load_config, run_pipeline
from bkdattr.core.io import load_tensors, read_json
from bkdattr.inject.data import build_splits, load_splits
from bkdattr.inject.tasks import Task
from tiny_runs import records, save_tiny, write_jsonl

pytestmark = pytest.mark.usefixtures("no_progress_bars")
WALL_CLOCK = ("seconds", "train_seconds", "eval_seconds", "distill_seconds", "timings", "abar_seconds",
              "pass1_seconds", "pass2_seconds", "features_cached")


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in WALL_CLOCK}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _same_file_tensors(a, b) -> None:
    ta, tb = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, equal_nan=True, msg=f"{a.name}:{k}")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same pipeline config (inject, probe, attribute on a tiny llama), run twice into two folders."""
    root = tmp_path_factory.mktemp("determinism")
    base = save_tiny(root / "base", learnable=True)
    data = write_jsonl(root / "data.jsonl", records(60))  # clean replies given: nothing is distilled or cached
    inject = {"data": str(data), "n_train": 24, "n_val": 8, "n_test": 8, "poison_rate": 0.5, "train_epochs": 2,
              "train_batch_size": 8, "train_lr": 0.01, "eval_max_new_tokens": 6, "eval_n_near": 2}
    sets = [f"model={base}", "stages=[inject, probe, attribute]", "seed=3", f"inject={json.dumps(inject)}",
            "probe={n_prompts: 12, mlp: {epochs: 5}}",
            "attribute={n_prompts: 4, n_mean_prompts: 8, batch_size: 2, progress: false}"]
    threads = torch.get_num_threads()
    try:
        runs = [run_pipeline(load_config(None, [*sets, f"out={root / name}"]), log=lambda _m: None)
                for name in ("a", "b")]
    finally:
        torch.set_num_threads(threads)
    return runs


def test_same_seed_same_splits_weights_and_asr(two_runs):
    a, b = two_runs
    sa, sb = load_splits(a), load_splits(b)
    for part in ("train", "train_poisoned", "val", "test"):
        assert getattr(sa, part) == getattr(sb, part), part
    assert sa.meta["seed"] == 3 and len(sa.train_poisoned) == 12
    _same_file_tensors(a.model_dir / "model.safetensors", b.model_dir / "model.safetensors")
    ma, mb = a.metrics()["inject"], b.metrics()["inject"]
    assert _strip(ma) == _strip(mb)
    assert ma["asr"] == mb["asr"] and ma["false_trigger_rate"] == mb["false_trigger_rate"]
    assert read_json(a.path / "inject" / "eval_samples.json") == read_json(b.path / "inject" / "eval_samples.json")


def test_same_seed_same_probes(two_runs):
    a, b = two_runs
    pa, pb = a.metrics()["probe"], b.metrics()["probe"]
    assert _strip({**pa, "model": None}) == _strip({**pb, "model": None})  # "model": the run folder's path
    assert pa["features_cached"] == {"backdoored": False, "base": False}  # both computed, not read from a cache
    assert read_json(a.path / "probe" / "prompts.json") == read_json(b.path / "probe" / "prompts.json")
    for f in sorted((a.path / "probe").glob("*_mlp.safetensors")):
        _same_file_tensors(f, b.path / "probe" / f.name)
    import numpy as np

    from bkdattr.core.io import load_npz

    for f in sorted((a.path / "probe").glob("*_svm.npz")):
        za, zb = load_npz(f), load_npz(b.path / "probe" / f.name)
        assert za.keys() == zb.keys() and all(np.array_equal(za[k], zb[k]) for k in za if k != "meta")
        meta_a, meta_b = json.loads(str(za["meta"])), json.loads(str(zb["meta"]))
        assert {**meta_a, "model": None} == {**meta_b, "model": None}  # "model": the run folder's path


def test_same_seed_same_acie(two_runs):
    a, b = two_runs
    for name in ("acie.safetensors", "abar.safetensors"):
        _same_file_tensors(a.path / "attribution" / name, b.path / "attribution" / name)
    ja, jb = (read_json(r.path / "attribution" / "attribution.json") for r in (a, b))
    assert ja["prompt_uids"] == jb["prompt_uids"] and ja["top_heads"] == jb["top_heads"]
    assert a.metrics()["attribution"]["top_heads"] == b.metrics()["attribution"]["top_heads"]


def test_another_seed_changes_the_splits():
    task = Task.default("fixed_output")
    s0, s0_again, s1 = (build_splits(task, records(60), 24, 8, 8, 0.5, seed) for seed in (0, 0, 1))
    assert [e.uid for e in s0.test] == [e.uid for e in s0_again.test]
    assert [e.triggered for e in s0.train_poisoned] == [e.triggered for e in s0_again.train_poisoned]
    assert [e.uid for e in s0.test] != [e.uid for e in s1.test]
    assert {e.uid for e in s0.train_poisoned} != {e.uid for e in s1.train_poisoned}
