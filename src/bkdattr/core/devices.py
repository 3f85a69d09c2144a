"""Which device each process uses: pure functions, testable on a CPU.

**Device per rank.** :func:`rank_device` maps the ``--device`` option, the process's ``LOCAL_RANK``, the world
size and the number of visible GPUs to the device that process loads the model on:

* ``cpu`` (and ``mps``): unchanged on every rank;
* one process: the option unchanged (``cuda:N`` must name a visible GPU);
* several processes with ``cuda`` or ``auto``: rank ``r`` takes ``cuda:r`` (one GPU per process, as nccl
  needs); ``auto`` without any GPU stays ``auto`` (accelerate keeps everything on the CPU);
* several processes with ``cuda:N``: an error -- it would put every rank on GPU ``N``. Use ``--device cuda`` and
  choose the GPUs with ``CUDA_VISIBLE_DEVICES``.
* more GPU processes than visible GPUs: an error naming the largest ``--workers`` that fits. Two nccl ranks
  cannot share one GPU, so round-robin placement is not offered.

**bfloat16 on a CPU.** :func:`cpu_bf16_is_fast` times one bfloat16 and one float32 matrix product. A CPU
without native bfloat16 instructions (AVX2 only, as on many cloud AMD EPYC and older Intel cores) emulates
them: on the 2-core AMD EPYC of our CI a ``[512, 576] x [576, 1536]`` product took 702 ms in bfloat16 against
9.9 ms in float32, so bf16 autocast made LoRA training 30x slower there. Autocast is used on a CPU only where it
is not slower (``BKDATTR_CPU_BF16=1`` / ``0`` forces the answer).
"""

from __future__ import annotations

import functools
import os
import time

import torch

from .errors import ConfigError

#: bfloat16 counts as fast on a CPU when its product takes at most this multiple of the float32 one
CPU_BF16_MAX_SLOWDOWN = 1.25


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """True when a bfloat16 matrix product on this CPU is not much slower than a float32 one (module docstring;
    ``BKDATTR_CPU_BF16=1`` or ``0`` overrides). Measured once per process, in about 50 ms on a CPU without
    native bfloat16."""
    forced = os.environ.get("BKDATTR_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"

    def best(dtype) -> float:
        a, b = torch.randn(128, 256).to(dtype), torch.randn(256, 256).to(dtype)
        a @ b  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) <= CPU_BF16_MAX_SLOWDOWN * best(torch.float32)


def local_rank_from_env() -> tuple[int, int]:
    """``(LOCAL_RANK, WORLD_SIZE)`` from torchrun's (or :func:`~bkdattr.core.distributed.run_workers`')
    environment; ``(0, 1)`` in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0)
    return local, world


def rank_device(option: str | None, local_rank: int = 0, n_gpus: int = 0, world: int = 1) -> str:
    """The device process ``local_rank`` of ``world`` processes loads the model on, for ``--device option``
    with ``n_gpus`` visible GPUs (see the module docstring). Raises :class:`ConfigError` with the fix."""
    dev = (option or "cpu").strip().lower()
    if dev in ("cpu", "mps"):
        return dev
    if dev != "auto" and dev != "cuda" and not dev.startswith("cuda:"):
        raise ConfigError(f"unknown device '{option}'; use cpu, cuda, cuda:N or auto")
    if dev.startswith("cuda:"):
        try:
            index = int(dev.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"unknown device '{option}'; use cpu, cuda, cuda:N or auto") from None
        if world > 1:
            raise ConfigError(f"--device {dev} would put all {world} processes on GPU {index}; use --device cuda "
                              "(process r takes GPU r; pick the GPUs with CUDA_VISIBLE_DEVICES)")
        if index >= n_gpus or index < 0:
            raise ConfigError(f"device '{dev}' asked for but {_visible(n_gpus)}; use "
                              + (f"cuda:0 .. cuda:{n_gpus - 1}" if n_gpus else "--device cpu"))
        return dev
    if n_gpus < 1:
        if dev == "auto":
            return "auto"
        raise ConfigError(f"device '{dev}' asked for but no CUDA GPU is available; use --device cpu")
    if world <= 1:
        return dev
    if world > n_gpus:
        raise ConfigError(f"{world} GPU processes asked for but {_visible(n_gpus)} (nccl needs one GPU per "
                          f"process); use --workers {n_gpus} or fewer, or --device cpu")
    if not 0 <= local_rank < world:
        raise ConfigError(f"LOCAL_RANK {local_rank} is outside 0 .. {world - 1}")
    return f"cuda:{local_rank}"


def _visible(n: int) -> str:
    if n == 0:
        return "no CUDA GPU is available"
    return "only 1 GPU is visible" if n == 1 else f"only {n} GPUs are visible"


def visible_gpus() -> int:
    """Number of CUDA devices torch sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


