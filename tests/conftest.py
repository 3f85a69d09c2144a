"""Shared pytest options and fixtures.

``--device`` (cpu by default, e.g. ``--device cuda``) selects where model tests run, as in nnsight's suite.
Tests marked ``slow`` load the real embedded model (SmolLM2-135M); ``-m "not slow"`` skips them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_addoption(parser):
    parser.addoption("--device", action="store", default="cpu", help="device for model tests: cpu, cuda, cuda:N")


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.getoption("--device")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (loaded once per session)."""
    from bkdattr.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(int(os.environ.get("BKDATTR_THREADS", "2")))
