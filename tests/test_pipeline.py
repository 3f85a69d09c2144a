"""Pipeline mechanics: config + overrides, stage keys, skip on rerun, rerun downstream on change, resume."""

from __future__ import annotations

import pytest

from bkdattr.app import pipeline
from bkdattr.app.pipeline import PipelineConfig, apply_overrides, load_config, run_pipeline, stage_keys
from bkdattr.core.errors import ConfigError, InputFileError


@pytest.fixture()
def fake_stages(monkeypatch):
    calls: list[str] = []

    def make(name):
        def runner(run, options):
            calls.append(name)
            if options.get("fail"):
                raise RuntimeError(f"{name} failed")
            run.update_metrics(name, {"ran": True, "seed": options["seed"]})
        return runner

    monkeypatch.setattr(pipeline, "check_stage_options", lambda cfg: None)  # the fake stages take fake options
    for stage in pipeline.STAGES:
        monkeypatch.setitem(pipeline.RUNNERS, stage, make(stage))
    return calls


def test_each_stage_runs_its_stage_function():
    from bkdattr.app.report import samples
    from bkdattr.attribution import stage as attribute
    from bkdattr.control import stage as control
    from bkdattr.probe import stage as probe

    assert pipeline.RUNNERS == {"inject": pipeline._inject_stage, "probe": probe.run_stage,
                                "attribute": attribute.run_stage, "ablate": control.run_ablation_stage,
                                "vector": control.run_vector_stage, "samples": samples.run_stage,
                                "report": pipeline._report_stage}
    assert pipeline.CONFIGS == {"inject": pipeline.InjectConfig, "probe": probe.ProbeStageConfig,
                                "attribute": attribute.AttributeConfig, "ablate": control.AblationConfig,
                                "vector": control.VectorConfig}


def _cfg(tmp_path, *sets):
    return load_config(None, [f"out={tmp_path / 'run'}", *sets])


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["task=jailbreak", "inject.train.epochs=3", "probe.n_prompts=50", "threads=2"])
    assert cfg.task == "jailbreak" and cfg.inject == {"train.epochs": 3} and cfg.probe == {"n_prompts": 50}
    assert cfg.threads == 2 and cfg.model == "smollm2-135m"
    y = tmp_path / "c.yaml"
    y.write_text("task: label_flip\nseed: 3\nvector:\n  alpha: 2.0\n")
    cfg = load_config(y, ["seed=4"])
    assert (cfg.task, cfg.seed, cfg.vector) == ("label_flip", 4, {"alpha": 2.0})


@pytest.mark.parametrize("sets, match", [
    (["nonsense=1"], "unknown option 'nonsense'"),
    (["no_equals"], "is not key=value"),
    (["seed.x=1"], "has no sub-options"),
    (["stages=[inject, bogus]"], "unknown stage"),
    (["inject.epochs=3"], r"unknown inject option\(s\) \['epochs'\]; known: seed, profile"),
    (["vector.select_by=nope"], "unknown select_by 'nope'"),
])
def test_bad_overrides(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


def test_bad_config_files(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(InputFileError, match="invalid YAML"):
        load_config(bad)
    unk = tmp_path / "unk.yaml"
    unk.write_text("taks: jailbreak\n")
    with pytest.raises(ConfigError, match="unknown option 'taks'"):
        load_config(unk)


def test_keys_change_downstream_only():
    a = stage_keys(PipelineConfig())
    b = stage_keys(apply_overrides(PipelineConfig(), ["attribute.metric=geo_mean"]))
    assert a["inject"] == b["inject"] and a["probe"] == b["probe"]
    for s in ("attribute", "ablate", "vector", "samples", "report"):
        assert a[s] != b[s], s


def test_rerun_skips_and_change_reruns_downstream(tmp_path, fake_stages):
    run = run_pipeline(_cfg(tmp_path), log=lambda s: None)
    assert len(fake_stages) == len(pipeline.STAGES)
    timings = run.metrics()["timings"]
    assert set(timings) == set(pipeline.STAGES) | {"peak_rss_mb"}  # no CUDA here: no cuda_peak_mb section
    assert set(timings["peak_rss_mb"]) == set(pipeline.STAGES) and min(timings["peak_rss_mb"].values()) > 0
    fake_stages.clear()
    run_pipeline(_cfg(tmp_path), log=lambda s: None)
    assert fake_stages == []
    run_pipeline(_cfg(tmp_path, "vector.alpha=2"), log=lambda s: None)
    assert fake_stages == ["vector", "samples", "report"]


def test_failed_stage_resumes_there(tmp_path, fake_stages):
    with pytest.raises(RuntimeError, match="failed"):
        run_pipeline(_cfg(tmp_path, "attribute.fail=true"), log=lambda s: None)
    assert fake_stages == ["inject", "probe", "attribute"]
    fake_stages.clear()
    run_pipeline(_cfg(tmp_path), log=lambda s: None)  # the fixed option changes attribute's key only
    assert fake_stages[0] == "attribute" and not {"inject", "probe"} & set(fake_stages)
