"""Mean triggered contributions ``abar_{l,h}``: what each head writes at ``p(x~)`` on average when the trigger
is present.

For every triggered prompt ``x~`` the pre-hook of :func:`bkdattr.hooks.capture_contributions` reads the
input ``z_l`` of each layer's output projection at the last prompt position and splits it into per-head
contributions ``a_{l,h}(x~) = W_O^l[:, h] z_{l,h}(x~)`` (all layers in one pass of the backbone, the LM head
is skipped). ``abar_{l,h}`` is their mean, accumulated in float32 as per-batch sums added in batch order, so a
sharded run (batches split over ranks, :mod:`bkdattr.attribution.distributed`) gives the identical tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..hooks import capture_contributions
from ..models import input_device
from ..prompts import encode_prompts, render_prompt
from .distributed import assign, gather_units, is_main, ordered_sum, rank_world


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (``model.base_model``), or the model itself."""
    bb = getattr(model, "base_model", None)
    return bb if isinstance(bb, torch.nn.Module) and bb is not model else model


def length_order(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Indices of ``prompts`` sorted by rendered token length (stable), so batches need little padding."""
    lengths = [len(tokenizer(render_prompt(tokenizer, t), add_special_tokens=False).input_ids) for t in prompts]
    return sorted(range(len(prompts)), key=lambda i: (lengths[i], i))


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
    rank, world = rank_world()
    owner = assign([len(c) for c in chunks], world)
    sums = torch.zeros(len(chunks), arch.n_layers, arch.n_heads, arch.d_model, dtype=torch.float32)
    net, dev = backbone(lm.model), input_device(lm.model)
    mine = [i for i in range(len(chunks)) if owner[i] == rank]
    bar = tqdm(total=sum(len(chunks[i]) for i in mine), desc="mean contributions", unit="prompt",
               disable=not (progress and is_main()), leave=False)
    for i in mine:
        batch = encode_prompts(lm.tokenizer, [prompts[j] for j in chunks[i]], padding_side="left").to(dev)
        with capture_contributions(arch, batch.last_pos) as store:
            net(**batch.model_inputs(), use_cache=False)
        sums[i] = torch.stack([store[layer].sum(0).to("cpu", torch.float32) for layer in range(arch.n_layers)])
        bar.update(len(chunks[i]))
    bar.close()
    return gather_units(sums, owner), len(prompts)


def mean_contributions(lm, prompts: Sequence[str], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """``abar``: the mean head contribution at ``p(x)`` over ``prompts`` (normally triggered prompts), float32
    ``[L, H, d_model]``."""
    sums, n = contribution_sums(lm, prompts, batch_size, progress)
    return ordered_sum(sums) / n
