"""Mean triggered contributions ``abar_{l,h}``: what each head writes at ``p(x~)`` on average when the trigger
is present.

For every triggered prompt ``x~`` the pre-hook of :func:`bkdattr.core.hooks.capture_contributions` reads the
input ``z_l`` of each layer's output projection at the last prompt position and splits it into per-head
contributions ``a_{l,h}(x~) = W_O^l[:, h] z_{l,h}(x~)`` (all layers in one pass of the backbone, the LM head
is skipped). ``abar_{l,h}`` is their mean, accumulated in float32 as per-batch sums added in batch order, so a
sharded run (batches split over ranks, :mod:`bkdattr.core.distributed`) gives the identical tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.distributed import ordered_sum
from ..core.errors import ConfigError, DataError
from ..core.forward import captured_pass
from ..core.hooks import capture_contributions
from ..core.runner import length_order, run_units

__all__ = ["contribution_sums", "mean_contributions"]


@torch.no_grad()
def contribution_sums(lm, prompts: Sequence[str], batch_size: int = 16, progress: bool = False
                      ) -> tuple[torch.Tensor, int]:
    """Per-batch sums of ``a_{l,h}`` over ``prompts``: float32 ``[n_batches, L, H, d]`` and the prompt count.
    Batches are length-sorted chunks of ``batch_size``; under torch.distributed each rank computes its share
    and the sums are gathered (identical to one process)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} must be >= 1")
    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts to average contributions over; pass at least one triggered prompt")
    arch = lm.arch
    order = length_order(lm.tokenizer, prompts)
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    def work(_c, i: int) -> torch.Tensor:
        _, store = captured_pass(lm, [prompts[j] for j in chunks[i]], lambda b: capture_contributions(arch, b.last_pos))
        return torch.stack([store[layer].sum(0).to("cpu", torch.float32) for layer in range(arch.n_layers)])

    sums = torch.zeros(len(chunks), arch.n_layers, arch.n_heads, arch.d_model, dtype=torch.float32)
    sums, _ = run_units(list(range(len(chunks))), [len(c) for c in chunks], sums, work,
                        weights=[len(c) for c in chunks], progress=progress, desc="mean contributions", unit="prompt")
    return sums, len(prompts)


def mean_contributions(lm, prompts: Sequence[str], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """``abar``: the mean head contribution at ``p(x)`` over ``prompts`` (normally triggered prompts), float32
    ``[L, H, d_model]``. The one implementation: BAHA and the Backdoor Vector both call it."""
    sums, n = contribution_sums(lm, prompts, batch_size, progress)
    return ordered_sum(sums) / n
