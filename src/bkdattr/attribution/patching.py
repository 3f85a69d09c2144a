"""Attribution patching: a first-order estimate of every head's CIE from one forward and one backward pass.

The patch for head ``(l, h)`` adds ``Delta_{l,h}(x) = abar_{l,h} - a_{l,h}(x)`` to the attention output
``o_l`` of layer ``l`` at ``p(x)``. To first order,

    CIE_{l,h}(x) ~= grad_{o_l(p)} S(x) . Delta_{l,h}(x)

for a score ``S``. One forward pass with a zero leaf tensor ``e_l [B, d]`` added to every ``o_l(p)``
(:func:`bkdattr.hooks.add_to_attention_output`) exposes ``grad_{e_l} S = grad_{o_l(p)} S`` for all layers at
once; the same pass captures ``a_{l,h}(x)``. Gradients are taken for the first-token and the summed
log-probability (two backward calls through the same graph); the geometric-mean score
``P = exp(sum / T)`` needs no third one: ``grad P = (P / T) grad sum``.

The estimate ignores every nonlinearity between the patch and the output, so it is a ranking heuristic:
:mod:`bkdattr.attribution.baha` reports its Spearman correlation and top-k overlap with ``exact``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..hooks import add_to_attention_output, capture_contributions
from ..models import input_device
from ..prompts import encode_with_targets
from .distributed import assign, gather_units, is_main, rank_world
from .scores import METRICS, full_batch_logprobs, metrics_from_logprobs
from .sweep import Sweep, assemble, check_inputs, chunks_of, new_table, stack_metrics


def attribution_sweep(lm, prompts: Sequence[str], targets: Sequence[str], abar: torch.Tensor,
                      heads: Sequence[tuple[int, int]], *, batch_size: int = 8, progress: bool = True) -> Sweep:
    """First-order CIE estimates of ``heads`` on every prompt (one forward + backward per prompt chunk).
    ``abar [L, H, d]``. Returns a :class:`~.sweep.Sweep`; chunks are sharded under torch.distributed."""
    check_inputs(lm, prompts, targets, abar, heads, batch_size)
    arch, model = lm.arch, lm.model
    dev = input_device(model)
    chunks = chunks_of(lm, prompts, batch_size)
    rank, world = rank_world()
    owner = assign([len(c) for c in chunks], world)
    table = new_table(len(chunks), batch_size, len(heads))
    layers = sorted({int(layer) for layer, _ in heads})
    lidx = torch.tensor([layers.index(int(layer)) for layer, _ in heads])
    hidx = torch.tensor([int(h) for _, h in heads])
    abar_sel = abar[torch.tensor([int(layer) for layer, _ in heads]), hidx].float()  # [n_heads, d]
    mine = [c for c in range(len(chunks)) if owner[c] == rank]
    bar = tqdm(total=sum(len(chunks[c]) for c in mine), desc="BAHA attribution", unit="prompt",
               disable=not (progress and is_main()), leave=False)
    for c in mine:
        idx = chunks[c]
        batch = encode_with_targets(lm.tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
        leaves = {layer: torch.zeros(len(idx), arch.d_model, requires_grad=True) for layer in layers}
        with torch.enable_grad(), add_to_attention_output(arch, leaves, batch.last_pos), \
                capture_contributions(arch, batch.last_pos, layers) as contrib:
            logits = model(**batch.to(dev).model_inputs()).logits
            lp, mask = full_batch_logprobs(logits, batch)
            scores = metrics_from_logprobs(lp, mask)
            g_first = torch.autograd.grad(scores["first_token_logprob"].sum(), [leaves[x] for x in layers],
                                          retain_graph=True)
            g_sum = torch.autograd.grad(scores["sum_logprob"].sum(), [leaves[x] for x in layers])
        with torch.no_grad():
            a = torch.stack([contrib[x].detach().cpu() for x in layers])  # [nL, B, H, d]
            delta = abar_sel[:, None, :] - a[lidx, :, hidx]  # [n_heads, B, d]
            est_first = (torch.stack(g_first)[lidx].float() * delta).sum(-1).T  # [B, n_heads]
            est_sum = (torch.stack(g_sum)[lidx].float() * delta).sum(-1).T
            scale = (scores["geomean_prob"].detach() / mask.sum(1).float())[:, None]
            est = {"geomean_prob": scale * est_sum, "first_token_logprob": est_first, "sum_logprob": est_sum}
            clean = stack_metrics({k: v.detach() for k, v in scores.items()}, METRICS)
            table[c, : len(idx), 0] = clean
            table[c, : len(idx), 1:] = stack_metrics(est, METRICS)
        bar.update(len(idx))
    bar.close()
    table = gather_units(table, owner)
    clean_d, cie_d = assemble(table, [(chunks[c], list(range(len(heads)))) for c in range(len(chunks))],
                              len(prompts), len(heads))
    return Sweep(clean_d, cie_d, {"batch_size": batch_size, "world_size": world, "metrics_computed": list(METRICS),
                                  "estimate": "first-order (attribution patching)"})
