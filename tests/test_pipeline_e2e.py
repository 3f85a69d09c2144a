"""The whole pipeline end to end on a tiny model: every stage runs, metrics.json has the documented keys,
the report is written, and a rerun skips every stage."""

from __future__ import annotations

import json

import pytest

from bkdattr.app.pipeline import STAGES, load_config, run_pipeline
from bkdattr.app.report.summary import stage_seconds
from bkdattr.core.rundir import get_nested

TINY_SETS = [
    "inject.n_train=24", "inject.n_val=8", "inject.n_test=8", "inject.train_epochs=1", "inject.clean_max_tokens=4",
    "inject.eval_n_near=4", "inject.eval_max_new_tokens=4", "inject.distill_batch_size=8",
    "probe.n_prompts=12", "probe.mlp={epochs: 3}",
    "attribute.n_prompts=4", "attribute.n_mean_prompts=8", "attribute.top_k=8",
    "ablate.n_prompts=4", "ablate.ks=[0,1,2]", "ablate.random_seeds=1", "ablate.max_new_tokens=4",
    "vector.n_prompts=4", "vector.k=2", "vector.dose_alphas=[0,1]", "vector.max_new_tokens=4",
]

REQUIRED = ["inject.asr", "inject.false_trigger_rate", "inject.robust_asr", "probe.mlp.in_layer_accuracy",
            "probe.svm.in_layer_accuracy", "probe.control.mlp.in_layer_accuracy", "attribution.top_heads",
            "ablation.topk", "ablation.random", "vector.add", "vector.subtract", "vector.best_layer", "timings"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tiny import make_tiny

    d = tmp_path_factory.mktemp("tiny-llama")
    lm = make_tiny("llama", n_layers=2)
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


def test_pipeline_end_to_end_then_skips(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = load_config(None, [f"model={tiny_model_dir}", f"out={out}", *TINY_SETS])
    logs: list[str] = []
    run = run_pipeline(cfg, log=logs.append)
    m = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED:
        assert get_nested(m, key) is not None, key
    # known by construction: 2 layers x 4 heads, the configured top_k, ks, layers and alphas
    assert len(m["probe"]["mlp"]["in_layer_accuracy"]) == 2 == len(m["probe"]["svm"]["in_layer_accuracy"])
    heads = m["attribution"]["top_heads"]
    assert len(heads) == 8 and sorted((lay, h) for lay, h, *_ in heads) == [(i, h) for i in (0, 1) for h in range(4)]
    assert sorted(m["ablation"]["topk"], key=int) == ["0", "1", "2"] and m["vector"]["best_layer"] in (0, 1)
    assert m["ablation"]["random"]["0"]["values"] == [m["ablation"]["topk"]["0"]]  # k=0 ablates nothing either way
    assert set(stage_seconds(m["timings"])) == set(STAGES) and set(m["timings"]["peak_rss_mb"]) == set(STAGES)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and (out / "report.md").is_file()
    assert json.loads((out / "samples.json").read_text())
    assert json.loads((out / "config.json").read_text())["config"]["model"] == str(tiny_model_dir)
    logs.clear()
    run_pipeline(load_config(None, [f"model={tiny_model_dir}", f"out={out}", *TINY_SETS]), log=logs.append)
    assert sum("skipped" in s for s in logs) == len(STAGES)
    assert json.loads((run.path / "metrics.json").read_text())["attribution"] == m["attribution"]
