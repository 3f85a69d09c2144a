"""Peak memory of one block of code (a pipeline stage, a benchmark step), measured honestly per block.

``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the peak of the whole process lifetime, so in a long-lived
process it says nothing about the second stage. :func:`track_peak` measures the block itself:

* **host (RSS).** On Linux the kernel's high-water mark ``VmHWM`` (``/proc/self/status``) is reset to the
  current RSS at entry (``echo 5 > /proc/self/clear_refs``) and read at exit: the exact peak, including spikes
  between samples (``method="hwm"``). Where that is not possible (another OS, a locked-down ``/proc``), a daemon
  thread samples the current RSS every ``interval`` seconds and keeps the largest (``method="sample"``: spikes
  shorter than the interval can be missed); the thread is stopped and joined when the block exits, also on an
  exception.
* **CUDA.** ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (every visible device), when
  CUDA is initialised: the peak of tensors the caching allocator handed out (its reserved pool can be larger).

The RSS peak is the process's resident memory at its highest during the block -- what the machine had to hold
then, including memory the allocator kept from earlier blocks (the CPU pipeline's ``mallopt`` settings keep
freed heap memory resident, and a later block can reuse it without any rise); ``rss_rise`` is the growth above
the RSS at entry.

Blocks nest: before an inner block resets a counter, every enclosing block takes the counter's value so far,
so an outer peak is never lost to an inner reset.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MB = 1024 * 1024


def _status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def current_rss_bytes() -> int | None:
    """The process's resident set size now (bytes), or None where it cannot be read."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil  # lazy: not a dependency; used only where /proc is missing and it happens to be installed
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False where that is not possible."""
    if _status_kb("VmHWM") is None:
        return False
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _cuda_devices() -> list[int]:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    return list(range(torch.cuda.device_count()))


@dataclass
class PeakMemory:
    """What :func:`track_peak` measured; filled in when the block exits (all figures in bytes).

    ``rss_start``/``rss_end``: RSS at entry/exit; ``rss_peak``: the largest RSS during the block (None where RSS
    cannot be read); ``method``: ``"hwm"`` (exact) or ``"sample"``; ``cuda_peak``: ``{device index: peak bytes
    allocated}`` where CUDA was initialised (at entry or exit), else empty."""

    rss_start: int | None = None
    rss_peak: int | None = None
    rss_end: int | None = None
    method: str = "sample"
    cuda_peak: dict[int, int] = field(default_factory=dict)

    @property
    def rss_peak_mb(self) -> float | None:
        return None if self.rss_peak is None else round(self.rss_peak / _MB, 1)

    @property
    def rss_rise(self) -> int | None:
        """How far the peak rose above the RSS at entry (bytes): the block's own working memory."""
        return None if self.rss_peak is None or self.rss_start is None else self.rss_peak - self.rss_start

    @property
    def cuda_peak_mb(self) -> float | None:
        """The largest per-device CUDA peak (MiB), or None without CUDA."""
        return round(max(self.cuda_peak.values()) / _MB, 1) if self.cuda_peak else None

    def _take(self, rss: int | None, cuda: dict[int, int]) -> None:
        if rss is not None:
            self.rss_peak = rss if self.rss_peak is None else max(self.rss_peak, rss)
        for dev, v in cuda.items():
            self.cuda_peak[dev] = max(self.cuda_peak.get(dev, 0), v)


_active: list[PeakMemory] = []  # enclosing blocks, outermost first
_lock = threading.Lock()


def _cuda_peaks() -> dict[int, int]:
    return {d: int(torch.cuda.max_memory_allocated(d)) for d in _cuda_devices()}


def _before_reset(hwm: bool) -> None:
    """Hand the counters' values so far to every enclosing block (an inner block is about to reset them)."""
    if not _active:
        return
    rss = (_status_kb("VmHWM") or 0) * 1024 if hwm else None
    cuda = _cuda_peaks()
    for outer in _active:
        outer._take(rss if outer.method == "hwm" else None, cuda)


@contextlib.contextmanager
def track_peak(interval: float = 0.005, method: str = "auto") -> Iterator[PeakMemory]:
    """Measure the peak host RSS and CUDA allocation of the block (see the module docstring).

    ``method``: ``"auto"`` (the high-water mark where it can be reset, else sampling), ``"hwm"`` or
    ``"sample"``; ``interval``: the sampling period in seconds. Yields a :class:`PeakMemory` that is filled in
    when the block exits (also when it raises)."""
    if method not in ("auto", "hwm", "sample"):
        raise ValueError(f"unknown method {method!r}; use auto, hwm or sample")
    res = PeakMemory(rss_start=current_rss_bytes())
    with _lock:
        _before_reset(hwm=True)
        use_hwm = method != "sample" and _reset_hwm()
        if method == "hwm" and not use_hwm:
            raise RuntimeError("the RSS high-water mark cannot be reset on this system; use method='sample'")
        res.method = "hwm" if use_hwm else "sample"
        if _cuda_devices():
            for d in _cuda_devices():
                torch.cuda.reset_peak_memory_stats(d)
        _active.append(res)
    res._take(res.rss_start, {})
    stop = threading.Event()
    sampler = None
    if not use_hwm:
        def sample() -> None:
            while not stop.wait(interval):
                res._take(current_rss_bytes(), {})

        sampler = threading.Thread(target=sample, name="bkdattr-peak-rss", daemon=True)
        sampler.start()
    try:
        yield res
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
        with _lock:
            _active.remove(res)
            res.rss_end = current_rss_bytes()
            hwm = (_status_kb("VmHWM") or 0) * 1024 if use_hwm else None
            res._take(res.rss_end, _cuda_peaks())
            res._take(hwm, {})

