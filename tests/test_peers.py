"""Peers compute BAHA's patch the same way: nnsight (and TransformerLens, where installed) equal bkdattr ``exact``.

The patch code is ``benchmarks/bench_peers.py``'s own (one forward per head, the head's slice of the output
projection's input gives ``a_{l,h}``); the tools are the optional ``bench`` extra, so each test is skipped with the
reason when its tool is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bkdattr.attribution import attribute
from bkdattr.core.errors import ConfigError
from test_attribution import PROMPTS, TARGETS, strong_abar
from tiny import make_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers  # noqa: E402

M = "first_token_logprob"


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (optional: pip install -e '.[bench]')")


def _exact(lm, abar, heads):
    return attribute(lm, PROMPTS, TARGETS, abar, "exact", M, heads, batch_size=2, metrics=[M], progress=False)


@_needs("nnsight")
@pytest.mark.parametrize("teacher_force", ["full", "prompt"])
def test_nnsight_patch_equals_exact(teacher_force):
    lm = make_tiny("llama", n_layers=3)
    abar = strong_abar(lm)
    heads = bench_peers.select_heads("all", lm.arch.n_layers, lm.arch.n_heads)
    ex = _exact(lm, abar, heads)
    cie, seconds = bench_peers.nnsight_cie(lm, PROMPTS, TARGETS, abar, heads, batch_size=2,
                                           teacher_force=teacher_force)
    assert cie.shape == ex.cie[M].shape and seconds > 0
    assert not torch.isnan(cie).any()
    assert float(cie.abs().max()) > 1e-3  # the patch really moved the scores
    assert bench_peers.max_diff(cie, ex.cie[M], heads) <= 1e-5


@_needs("nnsight")
def test_nnsight_leaves_other_heads_unevaluated():
    lm = make_tiny("llama")
    abar = strong_abar(lm)
    heads = [(1, 2), (0, 0)]
    cie, _ = bench_peers.nnsight_cie(lm, PROMPTS[:3], TARGETS[:3], abar, heads, batch_size=2)
    evaluated = ~torch.isnan(cie[0])
    assert evaluated.sum() == 2 and evaluated[1, 2] and evaluated[0, 0]


@_needs("transformer_lens")
def test_transformer_lens_patch_equals_exact(tmp_path):
    lm = make_tiny("llama")
    lm.model.save_pretrained(tmp_path)
    abar = strong_abar(lm)
    heads = bench_peers.select_heads("1", lm.arch.n_layers, lm.arch.n_heads)
    ex = _exact(lm, abar, heads)
    bridge = bench_peers.boot_transformer_lens(tmp_path, lm)
    cie, _ = bench_peers.transformer_lens_cie(bridge, lm, PROMPTS, TARGETS, abar, heads, batch_size=2)
    assert bench_peers.max_diff(cie, ex.cie[M], heads) <= 1e-5


def test_select_heads():
    assert bench_peers.select_heads("1", 3, 2) == [(1, 0), (1, 1)]
    assert len(bench_peers.select_heads("all", 3, 2)) == 6
    for bad in ("3", "x", ""):
        with pytest.raises(ConfigError, match="--layers"):
            bench_peers.select_heads(bad, 3, 2)
