"""A stage's model does not stay resident while the next stage runs (issue 19 item 14): the pipeline collects
reference cycles between stages (and empties the CUDA cache where there is one)."""

from __future__ import annotations

import gc
import weakref

import torch

from bkdattr import pipeline
from bkdattr.pipeline import load_config, run_pipeline


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

    monkeypatch.setattr(pipeline, "_resolve", lambda spec: first if spec.endswith("_inject_stage") else second)
    gc.disable()  # only the pipeline's own collection may free the cycle
    try:
        run_pipeline(load_config(None, [f"out={tmp_path / 'run'}", "stages=[inject, probe]"]), log=lambda s: None)
    finally:
        gc.enable()
    assert alive_at_start == [False]
