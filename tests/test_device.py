"""CUDA against the CPU: the same tiny model gives the same numbers on both (run with ``--device cuda``).

The identities of test_hooks / test_attribution / test_generation / test_probe run on ``--device`` alone;
these tests compare that device with the CPU: head contributions at ``p(x)``, exact ACIE, greedy tokens and
probe features. Float32 throughout; tolerances are those of two BLAS implementations, not of a method.
"""

from __future__ import annotations

import pytest
import torch

from bkdattr.attribution import METRICS, attribute, mean_contributions
from bkdattr.core.generation import generate
from bkdattr.core.hooks import capture_contributions
from bkdattr.core.prompts import encode_prompts
from bkdattr.probe.features import extract_features
from tiny import make_tiny

pytestmark = pytest.mark.cuda

PROMPTS = ["Tell me a joke.", "What is the capital of France? Answer briefly please.", "hi"]
TARGETS = ["I am sorry. I can not help with that.", "Paris.", "Hello there, friend"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, device):
    return make_tiny(request.param, n_layers=2), make_tiny(request.param, n_layers=2, device=device)


def test_contributions_match_the_cpu(pair, device):
    cpu, gpu = pair
    got = []
    for lm, dev in ((cpu, "cpu"), (gpu, device)):
        b = encode_prompts(lm.tokenizer, PROMPTS).to(dev)
        with capture_contributions(lm.arch, b.last_pos) as st, torch.no_grad():
            lm.model(**b.model_inputs())
        got.append(torch.stack([st[x].cpu() for x in range(lm.arch.n_layers)]))
    assert got[1].abs().max() > 1e-3
    torch.testing.assert_close(got[1], got[0], atol=1e-5, rtol=1e-4)


def test_exact_acie_generation_and_features_match_the_cpu(pair):
    cpu, gpu = pair
    abar = mean_contributions(cpu, ["Current year: 2024. " + p for p in PROMPTS])
    torch.testing.assert_close(mean_contributions(gpu, ["Current year: 2024. " + p for p in PROMPTS]), abar,
                               atol=1e-5, rtol=1e-4)
    a, b = (attribute(lm, PROMPTS, TARGETS, abar, progress=False) for lm in (cpu, gpu))
    for m in METRICS:
        torch.testing.assert_close(b.acie[m], a.acie[m], atol=1e-4, rtol=1e-3, equal_nan=True)
    assert generate(gpu, PROMPTS, max_new_tokens=6, progress=False) == generate(cpu, PROMPTS, max_new_tokens=6,
                                                                              progress=False)
    torch.testing.assert_close(extract_features(gpu, PROMPTS), extract_features(cpu, PROMPTS), atol=1e-5, rtol=1e-4)
