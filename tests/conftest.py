"""Shared pytest options and fixtures.

``--device`` (``cpu`` by default; ``cuda``, ``cuda:N``, ``mps``) selects where the device-aware tests run, as in
nnsight's suite: tests that take the ``device`` fixture (hook identities, exact == reference, generation,
probe features) build their tiny models on that device. When the device is not available every such test is
skipped with the reason, never failed. Tests marked ``cuda`` need a CUDA device and run only under
``--device cuda[:N]``. Tests marked ``slow`` load the real embedded model (SmolLM2-135M); ``-m "not slow"``
skips them.

Fixtures: ``device``; ``embedded`` (the real model, once per session); ``make_tiny_run`` (a run folder as
``bkdattr inject`` leaves it, see :func:`tiny_runs.make_run`); ``no_progress_bars``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Training numerics must not depend on a timing: the CPU's bfloat16 probe times two matrix products, and under load
# it can flip between processes, changing every trained weight. Tests train in float32 unless they set it.
os.environ.setdefault("BKDATTR_CPU_BF16", "0")


@pytest.fixture(autouse=True)
def _bf16_probe_per_test():
    """A test that sets ``BKDATTR_CPU_BF16`` (or clears the probe) leaves no cached answer to the next one."""
    from bkdattr.core.devices import cpu_bf16_is_fast

    cpu_bf16_is_fast.cache_clear()
    yield
    cpu_bf16_is_fast.cache_clear()


def pytest_addoption(parser):
    parser.addoption("--device", action="store", default="cpu",
                     help="device for the device-aware model tests: cpu (default), cuda, cuda:N, mps")


def device_unavailable(name: str) -> str | None:
    """Why ``name`` cannot run tests here (a one-line reason), or None when it can."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        return f"--device {name} is not a torch device ({e})"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: CUDA is not available on this machine (torch.cuda.is_available() is False)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
        return None
    if dev.type == "mps":
        return None if torch.backends.mps.is_available() else f"--device {name}: MPS is not available here"
    return f"--device {name}: device type '{dev.type}' is not supported by the test suite"


def pytest_collection_modifyitems(config, items):
    name = config.getoption("--device")
    reason = device_unavailable(name)
    for item in items:
        if "cuda" not in item.keywords:
            continue
        if not name.startswith("cuda"):
            item.add_marker(pytest.mark.skip(reason=f"needs CUDA: run with --device cuda (this run: --device {name})"))
        elif reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device(request) -> str:
    """The ``--device`` of this run; skips the test (with the reason) when that device is not available."""
    name = request.config.getoption("--device")
    reason = device_unavailable(name)
    if reason:
        pytest.skip(reason)
    return name


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (loaded once per session)."""
    from bkdattr.core.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture()
def make_tiny_run(tmp_path):
    """Factory: ``make_tiny_run(name="run", **options)`` -> a :class:`~bkdattr.core.rundir.RunDir` under the
    test's ``tmp_path`` built by :func:`tiny_runs.make_run` (tiny untrained model, run.json, splits)."""
    from tiny_runs import make_run

    def make(name: str = "run", **options):
        return make_run(tmp_path / name, **options)

    return make


@pytest.fixture()
def no_progress_bars():
    """Switch off transformers' progress bars (loading/saving weights) so stderr holds only what bkdattr says."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    yield
    if was:
        logging.enable_progress_bar()


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(threads_per_worker())


def threads_per_worker() -> int:
    """Torch threads per test process: ``$BKDATTR_THREADS``, else the cores shared among pytest-xdist's workers
    (``make test`` runs ``-n auto``: 2 workers of 1 thread on a 2-core machine)."""
    if os.environ.get("BKDATTR_THREADS"):
        return int(os.environ["BKDATTR_THREADS"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 2) // workers)
