"""A stage's model does not stay resident while the next stage runs (issue 19 item 14): the pipeline collects
reference cycles between stages (and empties the CUDA cache where there is one)."""

from __future__ import annotations

import gc
import mmap
import weakref

import torch

from bkdattr.app import pipeline
from bkdattr.app.pipeline import load_config, run_pipeline
from bkdattr.app.report.summary import stage_seconds


class _Model(torch.nn.Module):
    """A module in a reference cycle (as a model with hooks or a peft wrapper can be)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(64, 64))
        self.me = [self]


def test_previous_stage_model_is_freed_before_the_next_stage(tmp_path, monkeypatch):
    refs: list[weakref.ref] = []
    alive_at_start: list[bool] = []

    def first(run, options):
        lm = _Model()
        refs.append(weakref.ref(lm))
        run.update_metrics("inject", {"ran": True})

    def second(run, options):
        alive_at_start.append(refs[0]() is not None)
        run.update_metrics("probe", {"ran": True})

    monkeypatch.setitem(pipeline.RUNNERS, "inject", first)
    monkeypatch.setitem(pipeline.RUNNERS, "probe", second)
    gc.disable()  # only the pipeline's own collection may free the cycle
    try:
        run_pipeline(load_config(None, [f"out={tmp_path / 'run'}", "stages=[inject, probe]"]), log=lambda s: None)
    finally:
        gc.enable()
    assert alive_at_start == [False]


def test_stage_peak_rss_is_per_stage(tmp_path, monkeypatch):
    """metrics.timings.peak_rss_mb: the stage that allocates 256 MiB reports it, the stage after it does not
    (a process-lifetime maximum such as ru_maxrss would report it for both)."""
    size = 256 * 1024 * 1024

    def big(run, options):
        t = torch.frombuffer(mmap.mmap(-1, size), dtype=torch.float32)  # fresh pages (not malloc's retained ones)
        t.fill_(1.0)
        del t
        run.update_metrics("inject", {"ran": True})

    def small(run, options):
        run.update_metrics("probe", {"ran": True})

    monkeypatch.setitem(pipeline.RUNNERS, "inject", big)
    monkeypatch.setitem(pipeline.RUNNERS, "probe", small)
    run = run_pipeline(load_config(None, [f"out={tmp_path / 'run'}", "stages=[inject, probe]"]), log=lambda s: None)
    t = run.metrics()["timings"]
    assert set(t) == {"inject", "probe", "peak_rss_mb"} and t["inject"] >= 0
    assert t["peak_rss_mb"]["inject"] - t["peak_rss_mb"]["probe"] >= 0.9 * size / 2**20
    assert stage_seconds(t) == {"inject": t["inject"], "probe": t["probe"]}


def test_record_timing_keeps_other_stages_and_drops_stale_figures():
    from bkdattr.app.memory import PeakMemory

    old = {"inject": 3.0, "probe": 2.0, "peak_rss_mb": {"inject": 900.0, "probe": 800.0},
           "cuda_peak_mb": {"probe": 50.0}}
    new = pipeline.record_timing(old, "probe", 1.234, PeakMemory(rss_peak=700 * 2**20))
    assert new == {"inject": 3.0, "probe": 1.23, "peak_rss_mb": {"inject": 900.0, "probe": 700.0}}
    assert old["cuda_peak_mb"] == {"probe": 50.0}  # the input is not changed
    cuda = pipeline.record_timing({}, "attribute", 5.0, PeakMemory(rss_peak=2**20, cuda_peak={0: 2**21, 1: 2**22}))
    assert cuda == {"attribute": 5.0, "peak_rss_mb": {"attribute": 1.0}, "cuda_peak_mb": {"attribute": 4.0}}
