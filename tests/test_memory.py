"""Peak memory per block (bkdattr.app.memory.track_peak): a known allocation inside the block raises the peak by at
least its size, in both the exact (high-water mark) and the sampling mode; blocks nest; no sampler thread
outlives its block, even when the block raises."""

from __future__ import annotations

import mmap
import threading
import time

import pytest
import torch

from bkdattr.app import memory
from bkdattr.app.memory import current_rss_bytes, track_peak

SIZE = 256 * 1024 * 1024  # 256 MiB


def _touch(nbytes: int) -> torch.Tensor:
    """A float32 tensor of ``nbytes`` in fresh pages, written (pages count in RSS only once written). The pages
    come from an anonymous mmap, not from malloc: what the allocator kept from earlier tests (the pipeline's
    mallopt settings keep freed memory resident) could otherwise hold it without any rise in RSS."""
    buf = mmap.mmap(-1, nbytes)
    t = torch.frombuffer(buf, dtype=torch.float32)
    t.fill_(1.0)
    return t


def _samplers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bkdattr-peak-rss"]


needs_rss = pytest.mark.skipif(current_rss_bytes() is None, reason="the RSS cannot be read on this system")


@needs_rss
@pytest.mark.parametrize("method", ["auto", "sample"])
def test_peak_rises_by_at_least_the_allocation(method):
    with track_peak(method=method, interval=0.001) as res:
        t = _touch(SIZE)
        if method == "sample":
            time.sleep(0.05)  # the sampler must see it
        del t
    assert res.rss_peak is not None and res.rss_rise >= SIZE * 0.98
    assert res.rss_end < res.rss_peak  # it was freed again: the peak is not just the end state
    # a block without the allocation reports a far smaller rise: the peak is per block, not per process
    with track_peak(method=method) as quiet:
        pass
    assert quiet.rss_rise < SIZE / 4


@needs_rss
def test_hwm_catches_a_spike_between_samples():
    if not memory._reset_hwm():
        pytest.skip("the RSS high-water mark cannot be reset here")
    with track_peak() as res:
        _touch(SIZE)  # allocated, written and freed at once: no sampler would see it
    assert res.method == "hwm" and res.rss_rise >= SIZE * 0.98


@needs_rss
@pytest.mark.parametrize("method", ["auto", "sample"])
def test_nested_blocks_keep_the_outer_peak(method):
    with track_peak(method=method, interval=0.001) as outer:
        t = _touch(SIZE)
        time.sleep(0.05)
        del t
        with track_peak(method=method) as inner:
            pass
    assert outer.rss_rise >= SIZE * 0.98
    assert inner.rss_rise < SIZE / 4


def test_no_sampler_thread_outlives_the_block_even_on_error():
    before = len(_samplers())
    with pytest.raises(KeyError):
        with track_peak(method="sample") as res:
            assert len(_samplers()) == before + 1
            raise KeyError("boom")
    assert len(_samplers()) == before
    assert (res.rss_end is not None) == (current_rss_bytes() is not None)  # filled in on the way out
    assert memory._active == []


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        with track_peak(method="psutil"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_rises_by_at_least_the_allocation():
    torch.cuda.init()
    with track_peak() as res:
        t = torch.empty(SIZE // 4, dtype=torch.float32, device="cuda")
        del t
    assert res.cuda_peak_mb is not None and max(res.cuda_peak.values()) >= SIZE
