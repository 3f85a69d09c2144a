"""Reference CIE: literally one full forward pass per head -- the semantic oracle the fast paths must match.

For each head ``(l, h)`` and each chunk of clean prompts (right-padded prompt + target rows from
:func:`bkdattr.prompts.encode_with_targets`), the whole model runs with
:func:`bkdattr.hooks.add_to_attention_output` adding ``abar_{l,h} - a_{l,h}(x)`` (per row) to layer ``l``'s
attention output at ``p(x)``; the scores come from the model's own logits (teacher forcing). The clean pass of
each chunk captures ``a_{l,h}(x)`` and the clean scores. Nothing is cached or reused: this is slow on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..hooks import add_to_attention_output, capture_contributions
from ..models import input_device
from ..prompts import encode_with_targets
from .distributed import assign, gather_units, is_main, rank_world
from .scores import METRICS, cie_from_logprobs, full_batch_logprobs, metrics_from_logprobs
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
    rank, world = rank_world()
    owner = assign([len(chunks[c]) for c, _ in units], world)
    table = new_table(len(units), batch_size, 1)
    mine = [u for u in range(len(units)) if owner[u] == rank]
    n = len(prompts)
    bar = tqdm(total=sum(len(chunks[units[u][0]]) for u in mine) / n, desc="BAHA reference", unit="head",
               disable=not (progress and is_main()), leave=False,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} heads [{elapsed}<{remaining}]")
    for c in sorted({units[u][0] for u in mine}):
        idx = chunks[c]
        batch = encode_with_targets(lm.tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
        inputs = batch.to(dev).model_inputs()
        with capture_contributions(arch, batch.last_pos) as contrib:
            logits = model(**inputs).logits
        lp_clean, mask = full_batch_logprobs(logits, batch)
        clean = stack_metrics(metrics_from_logprobs(lp_clean, mask), METRICS)
        for u in mine:
            if units[u][0] != c:
                continue
            layer, h = heads[units[u][1]]
            delta = abar[layer, h].float()[None] - contrib[layer][:, h].cpu()  # [B, d]
            with add_to_attention_output(arch, {layer: delta}, batch.last_pos):
                logits = model(**inputs).logits
            lp, _ = full_batch_logprobs(logits, batch)
            table[u, : len(idx), 0] = clean
            table[u, : len(idx), 1] = stack_metrics(cie_from_logprobs(lp, lp_clean, mask), METRICS)
            bar.update(len(idx) / n)
    bar.close()
    table = gather_units(table, owner)
    clean_d, cie_d = assemble(table, [(chunks[c], [i]) for c, i in units], n, len(heads))
    return Sweep(clean_d, cie_d, {"batch_size": batch_size, "world_size": world, "metrics_computed": list(METRICS)})
