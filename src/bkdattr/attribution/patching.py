"""Attribution patching: a first-order estimate of every head's CIE from one forward and one backward pass.

The patch for head ``(l, h)`` adds ``Delta_{l,h}(x) = abar_{l,h} - a_{l,h}(x)`` to the attention output
``o_l`` of layer ``l`` at ``p(x)``. To first order,

    CIE_{l,h}(x) ~= grad_{o_l(p)} S(x) . Delta_{l,h}(x)

for a score ``S``. One forward pass with a zero leaf tensor ``e_l [B, d]`` added to every ``o_l(p)``
(:func:`bkdattr.core.hooks.add_to_attention_output`) exposes ``grad_{e_l} S = grad_{o_l(p)} S`` for all layers at
once; the same pass captures ``a_{l,h}(x)``. Gradients are taken for the first-token and the summed
log-probability (two backward calls through the same graph); the geometric-mean score
``P = exp(sum / T)`` needs no third one: ``grad P = (P / T) grad sum``.

Only ``p(x)`` and the target tokens carry gradient: the prompt before ``p(x)`` cannot see the patch (causal
attention), so it runs once without autograd and its KV cache feeds the differentiated *suffix* pass (the
layout of :func:`~bkdattr.attribution.scores.encode_aligned`, as in the exact path). Asking for the
first-token score alone shrinks the suffix to the single column ``p(x)``. On the first chunk the cached pass is
checked against a plain full pass; a model where they differ falls back to full passes, with a warning.

The estimate ignores every nonlinearity between the patch and the output, so it is a ranking heuristic:
:mod:`bkdattr.attribution.baha` reports its Spearman correlation and top-k overlap with ``exact``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..core.distributed import is_main
from ..core.forward import PrefixCache, keep_logits_kwargs
from ..core.hooks import add_to_attention_output, capture_contributions
from ..core.models import input_device
from ..core.runner import run_units
from ..core.scoring import token_logprobs
from .scores import METRICS, AlignedBatch, encode_aligned, metrics_from_logprobs
from .sweep import Sweep, assemble, check_inputs, chunks_of, new_table, stack_metrics


def scored_pass(lm, batch: AlignedBatch, leaves: dict[int, torch.Tensor], layers: Sequence[int],
                prefix_cache: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Teacher-forced target log-probs ``[B, T]`` (0 where masked) with ``leaves[l] [B, d]`` added to layer
    ``l``'s attention output at ``p(x)``, and the contributions ``{l: [B, H, d]}`` at ``p(x)`` of ``layers``.
    With ``prefix_cache`` the prompt before ``p(x)`` runs once under ``no_grad`` and only the suffix (``p(x)``
    and the target tokens) is differentiable."""
    model, dev = lm.model, input_device(lm.model)
    w, t, b = batch.prompt_width, batch.target_width, batch.size
    ids, mask, pos = (x[:, : w - 1 + t].to(dev) for x in (batch.input_ids, batch.attention_mask, batch.position_ids))
    pre = PrefixCache.build(model, ids[:, : w - 1], mask[:, : w - 1], pos[:, : w - 1]) if prefix_cache else None
    if pre is not None:
        inputs = {"input_ids": ids[:, w - 1:], "attention_mask": mask, "position_ids": pos[:, w - 1:],
                  "use_cache": True, **pre.kwargs(model)}
        col = 0
    else:  # the LM head on the last t columns only (p(x) and the target tokens that predict the rest)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": False,
                  **keep_logits_kwargs(model, t)}
        col = w - 1
    at = torch.full((b,), col, dtype=torch.long)
    with add_to_attention_output(lm.arch, leaves, at), capture_contributions(lm.arch, at, layers) as contrib:
        logits = model(**inputs).logits[:, -t:]  # columns col .. col + t - 1 of the input
    tmask = batch.target_mask.to(logits.device)
    lp = token_logprobs(logits, batch.target_ids.to(logits.device))
    return torch.where(tmask, lp, torch.zeros((), device=lp.device)).cpu(), contrib


def _cache_matches(lm, batch: AlignedBatch, layers: Sequence[int]) -> tuple[bool, float]:
    """Does the cached suffix pass give the log-probs of a plain full pass (first two rows)?"""
    small = AlignedBatch(*(x[:2] for x in (batch.input_ids, batch.attention_mask, batch.position_ids)),
                         batch.prompt_width, batch.target_ids[:2], batch.target_mask[:2])
    zeros = {x: torch.zeros(small.size, lm.arch.d_model) for x in layers}
    with torch.no_grad():
        a, _ = scored_pass(lm, small, zeros, layers, prefix_cache=True)
        b, _ = scored_pass(lm, small, zeros, layers, prefix_cache=False)
    diff = float((a - b).abs().max())
    return diff <= (1e-3 if lm.dtype == torch.float32 else 0.25), diff


def attribution_sweep(lm, prompts: Sequence[str], targets: Sequence[str], abar: torch.Tensor,
                      heads: Sequence[tuple[int, int]], *, batch_size: int = 8, metrics: Sequence[str] | None = None,
                      prefix_cache: bool = True, progress: bool = True) -> Sweep:
    """First-order CIE estimates of ``heads`` on every prompt (one forward + backward per prompt chunk).
    ``abar [L, H, d]``; ``metrics``: the scores to estimate (default all; ``first_token_logprob`` alone needs
    one suffix column and one backward call). Returns a :class:`~.sweep.Sweep`; chunks are sharded under
    torch.distributed."""
    check_inputs(lm, prompts, targets, abar, heads, batch_size)
    wanted = tuple(metrics or METRICS)
    first_only = set(wanted) == {"first_token_logprob"}
    arch = lm.arch
    chunks = chunks_of(lm, prompts, batch_size)
    layers = sorted({int(layer) for layer, _ in heads})
    lidx = torch.tensor([layers.index(int(layer)) for layer, _ in heads])
    hidx = torch.tensor([int(h) for _, h in heads])
    abar_sel = abar[torch.tensor([int(layer) for layer, _ in heads]), hidx].float()  # [n_heads, d]
    check = {"use_cache": prefix_cache, "diff": None, "done": not prefix_cache}

    def prepare(c: int) -> AlignedBatch:
        idx = chunks[c]
        batch = encode_aligned(lm.tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
        if first_only:
            batch = batch.truncate_targets(1)
        if not check["done"]:  # on chunk 0, first on every rank: the same decision everywhere
            check["done"] = True
            ok, check["diff"] = _cache_matches(lm, batch, layers)
            if not ok:
                check["use_cache"] = False
                if is_main():
                    warnings.warn(f"attribution patching: the cached suffix pass differs from a full pass by "
                                  f"{check['diff']:.2e}; using full passes", stacklevel=3)
        return batch

    def work(batch: AlignedBatch, c: int) -> torch.Tensor:
        leaves = {layer: torch.zeros(batch.size, arch.d_model, requires_grad=True) for layer in layers}
        with torch.enable_grad():
            lp, contrib = scored_pass(lm, batch, leaves, layers, check["use_cache"])
            scores = metrics_from_logprobs(lp, batch.target_mask)
            g_first = torch.autograd.grad(scores["first_token_logprob"].sum(), [leaves[x] for x in layers],
                                          retain_graph=not first_only)
            g_sum = None if first_only else torch.autograd.grad(scores["sum_logprob"].sum(),
                                                                [leaves[x] for x in layers])
        with torch.no_grad():
            a = torch.stack([contrib[x].detach().cpu() for x in layers])  # [nL, B, H, d]
            delta = abar_sel[:, None, :] - a[lidx, :, hidx]  # [n_heads, B, d]
            est_first = (torch.stack(g_first)[lidx].float() * delta).sum(-1).T  # [B, n_heads]
            est = {"first_token_logprob": est_first}
            if g_sum is not None:
                est_sum = (torch.stack(g_sum)[lidx].float() * delta).sum(-1).T
                scale = (scores["geomean_prob"].detach() / batch.target_mask.sum(1).float())[:, None]
                est.update(geomean_prob=scale * est_sum, sum_logprob=est_sum)
            clean = stack_metrics({k: v.detach() for k, v in scores.items()}, wanted)
            # metrics not wanted become NaN (stack_metrics takes their shape from est_first)
            return torch.cat([clean[:, None], stack_metrics({**{m: est_first for m in METRICS}, **est}, wanted)], 1)

    n_chunks = len(chunks)
    table = new_table(n_chunks, batch_size, len(heads))
    table, info = run_units(list(range(n_chunks)), [len(c) for c in chunks], table, work, prepare,
                            always=(0,) if prefix_cache else (), weights=[len(c) for c in chunks], progress=progress,
                            desc="BAHA attribution", unit="prompt")
    clean_d, cie_d = assemble(table, [(chunks[c], list(range(len(heads)))) for c in range(n_chunks)],
                              len(prompts), len(heads))
    return Sweep(clean_d, cie_d, {"batch_size": batch_size, "world_size": info["world_size"],
                                  "metrics_computed": list(wanted), "estimate": "first-order (attribution patching)",
                                  "prefix_cache": check["use_cache"], "cache_check_max_abs_diff": check["diff"],
                                  "target_columns": 1 if first_only else "all"})
