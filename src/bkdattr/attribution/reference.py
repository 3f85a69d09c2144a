"""Reference CIE: literally one full forward pass per head -- the semantic oracle the fast paths must match.

For each head ``(l, h)`` and each chunk of clean prompts (right-padded prompt + target rows from
:func:`bkdattr.core.prompts.encode_with_targets`), the whole model runs with
:func:`bkdattr.core.hooks.add_to_attention_output` adding ``abar_{l,h} - a_{l,h}(x)`` (per row) to layer ``l``'s
attention output at ``p(x)``; the scores come from the model's own body and LM head (teacher forcing; the head
runs on the target-predicting positions only). The clean pass of each chunk captures ``a_{l,h}(x)`` and the
clean scores. Nothing is cached or reused: this is slow on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.hooks import add_to_attention_output, capture_contributions
from ..core.models import input_device
from ..core.prompts import encode_with_targets
from ..core.runner import run_units
from ..core.scoring import target_logprobs
from .scores import METRICS, cie_from_logprobs, metrics_from_logprobs
from .sweep import Sweep, assemble, check_inputs, chunks_of, new_table, stack_metrics


@torch.no_grad()
def reference_sweep(lm, prompts: Sequence[str], targets: Sequence[str], abar: torch.Tensor,
                    heads: Sequence[tuple[int, int]], *, batch_size: int = 8, progress: bool = True) -> Sweep:
    """CIE of each head in ``heads`` on each prompt, one full pass per (head, chunk). ``abar [L, H, d]``.
    Returns a :class:`~.sweep.Sweep` with every metric. Sharded over (chunk, head) units under
    torch.distributed."""
    check_inputs(lm, prompts, targets, abar, heads, batch_size)
    arch, model = lm.arch, lm.model
    dev = input_device(model)
    chunks = chunks_of(lm, prompts, batch_size)
    units = [(c, i) for c in range(len(chunks)) for i in range(len(heads))]
    n = len(prompts)

    def prepare(c: int):
        idx = chunks[c]
        batch = encode_with_targets(lm.tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
        inputs = batch.to(dev).model_inputs()
        with capture_contributions(arch, batch.last_pos) as contrib:
            lp_clean, mask = target_logprobs(model, inputs, batch)
        return batch, inputs, contrib, lp_clean, mask, stack_metrics(metrics_from_logprobs(lp_clean, mask), METRICS)

    def work(state, u: int) -> torch.Tensor:
        batch, inputs, contrib, lp_clean, mask, clean = state
        layer, h = heads[units[u][1]]
        delta = abar[layer, h].float()[None] - contrib[layer][:, h].cpu()  # [B, d]
        with add_to_attention_output(arch, {layer: delta}, batch.last_pos):
            lp, _ = target_logprobs(model, inputs, batch)
        return torch.stack([clean, stack_metrics(cie_from_logprobs(lp, lp_clean, mask), METRICS)], dim=1)

    table = new_table(len(units), batch_size, 1)
    table, info = run_units([c for c, _ in units], [len(chunks[c]) for c, _ in units], table, work, prepare,
                            weights=[len(chunks[c]) / n for c, _ in units], progress=progress,
                            desc="BAHA reference", unit="head",
                            bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} heads [{elapsed}<{remaining}]")
    clean_d, cie_d = assemble(table, [(chunks[c], [i]) for c, i in units], n, len(heads))
    return Sweep(clean_d, cie_d, {"batch_size": batch_size, "world_size": info["world_size"],
                                  "metrics_computed": list(METRICS)})
