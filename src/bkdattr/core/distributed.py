"""Scale-out with ``torch.distributed``: shard the work units of an attribution across processes and gather
one result that is *bitwise identical* to the single-process run.

How identity is kept: the work is cut into units whose composition does not depend on the number of
processes (a unit is e.g. "all heads of layer ``l`` on prompt chunk ``c``"). Every rank computes the units it
owns exactly as a single process would (same batch shapes, same order of operations), the owners are chosen
by a deterministic greedy longest-processing-time assignment (:func:`assign`), and :func:`gather_units`
copies each unit's values from its owner -- no cross-rank arithmetic. Means are gathered as per-batch sums
and added in batch order on every rank (:func:`ordered_sum`). The runner every method uses is
:func:`bkdattr.core.runner.run_units`.

Identity holds at the same torch thread count per process: CPU kernels split some reductions by thread, so
the thread count itself moves exact CIE by up to ~2.5e-5 on the embedded model (1 vs 2 threads, one process).
``--workers N`` gives each worker ``cores // N`` threads unless ``threads`` is set; with ``threads`` equal to
the single process's, ``--workers 2`` reproduces it bit for bit (measured on the embedded model).

Entry points:

* ``torchrun --nproc_per_node N bkdattr attribute ...`` -- :func:`init_from_env` joins the process group
  that torchrun describes in ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``;
* ``bkdattr attribute --workers N`` (or :func:`run_workers` from Python) -- spawns ``N`` local processes
  with a fresh TCP rendezvous.

The backend is ``gloo`` on CPU and ``nccl`` on CUDA (:func:`backend_for`). With one process nothing here
touches ``torch.distributed``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import ConfigError


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes artifacts and prints."""
    return rank_world()[0] == 0


def backend_for(device: str | torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if str(device).startswith("cuda") or str(device) == "auto" and torch.cuda.is_available() \
        else "gloo"


def assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each unit: greedy longest-processing-time on the ``costs`` (deterministic: ties go to
    the lower unit index and the lower rank)."""
    if world < 1:
        raise ConfigError(f"world size {world} must be >= 1")
    load = [0.0] * world
    owner = [0] * len(costs)
    for u in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[u] = r
        load[r] += float(costs[u])
    return owner


def _comm_device() -> torch.device:
    """Where collective tensors live: the current CUDA device under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_units(values: torch.Tensor, owner: Sequence[int]) -> torch.Tensor:
    """``values [U, ...]`` holds this rank's units (rows it owns); return the full tensor with every row
    copied from its owner. Identity without a process group.

    Each rank sends only the rows it owns (packed, padded to the largest share), so the traffic and the
    receive buffers are ``world x max share`` rows, not ``world x U``. The packed rows travel on the backend's
    device; the table is reassembled on ``values``' device with CPU indices (index and table always on one
    device)."""
    if not is_distributed():
        return values
    world, rank = dist.get_world_size(), dist.get_rank()
    own = torch.as_tensor(list(owner), dtype=torch.long)
    rows = [(own == r).nonzero().flatten() for r in range(world)]  # CPU indices, the same on every rank
    width = max(1, max(len(x) for x in rows))
    dev = _comm_device()
    packed = torch.zeros((width, *values.shape[1:]), dtype=values.dtype, device=dev)
    packed[: len(rows[rank])] = values.detach()[rows[rank].to(values.device)].to(dev)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed)
    out = values.detach().clone()
    for r in range(world):
        if len(rows[r]):
            out[rows[r].to(out.device)] = parts[r][: len(rows[r])].to(out.device)
    return out


def ordered_sum(parts: torch.Tensor) -> torch.Tensor:
    """Sum ``parts [U, ...]`` over dim 0 strictly in unit order (the same float result on every rank and in a
    single process, whatever the sharding)."""
    total = torch.zeros_like(parts[0])
    for p in parts:
        total += p
    return total


def barrier() -> None:
    """Wait for every rank (under nccl on this rank's own GPU, so no rank blocks on device 0)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1); return whether this
    call created it (then the caller leaves it with :func:`shutdown`). A group that is already initialised is
    kept (and False returned)."""
    if dist.is_available() and dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Leave the process group (if this process created one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, backend: str, threads: int | None,
            target: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(int(threads))
    if backend == "nccl":
        torch.cuda.set_device(rank % max(1, torch.cuda.device_count()))
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        target(*args)
        barrier()  # every rank is done before any rank tears gloo's connections down (else: SIGABRT)
    finally:
        dist.destroy_process_group()


def run_workers(n: int, target: Callable[..., Any], args: tuple = (), backend: str = "gloo",
                threads: int | None = None) -> None:
    """Run ``target(*args)`` in ``n`` spawned processes that form one process group (``backend``), each with
    ``threads`` torch threads (default: CPU cores // n). ``target`` must be importable (a module-level
    function); rank 0 is expected to write the results. Raises if any worker fails."""
    if n < 1:
        raise ConfigError(f"--workers {n} must be >= 1")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // n)
    mp.start_processes(_worker, args=(n, free_port(), backend, threads, target, tuple(args)), nprocs=n,
                       join=True, start_method="spawn")
