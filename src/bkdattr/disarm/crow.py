"""``disarm --strategy crow``: a CROW-style baseline, internal-consistency regularisation with no trigger used.

CROW (Min et al., "CROW: Eliminating Backdoors from Large Language Models via Internal Consistency
Regularization", ICML 2025) observes that in a backdoored model the trigger makes the hidden states jump between
consecutive layers, where a clean model's stay smooth, and fine-tunes on about 100 clean samples with

    L = L_LM(x) + alpha * L_cons(e(x) + delta),    L_cons = mean_l mean_t (1 - cos(h_{l+1,t}, h_{l,t}))

where ``h_l`` are the hidden states after layer ``l`` (the embedding output first), averaged over the real
(unpadded) tokens of the batch, and ``delta`` a small adversarial step on the input embeddings in the direction
that most breaks the consistency (one signed-gradient step, FGSM-style), so the model learns to stay consistent
under perturbations like those a trigger causes. This is the project's own implementation from that description:
``delta = epsilon * rms(e) * sign(grad_e L_cons)``, with the step in units of the embeddings' RMS (per token) so
one ``epsilon`` suits every model's embedding scale. Each batch costs two forward passes (clean, then perturbed)
and one extra gradient with respect to the embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..core.forward import body_and_head
from ..inject.train import reply_loss


def consistency_loss(hidden: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``mean over consecutive pairs (l, l+1) of mean over real tokens of 1 - cos(h_l, h_{l+1})``.
    ``hidden``: ``L+1`` tensors ``[B, T, d]``; ``mask``: ``[B, T]`` (1 for a real token). A scalar."""
    m = mask.to(hidden[0].device).bool()
    terms = [1.0 - torch.nn.functional.cosine_similarity(a[m].float(), b[m].float(), dim=-1).mean()
             for a, b in zip(hidden[:-1], hidden[1:], strict=True)]
    return torch.stack(terms).mean()


def crow_loss(alpha: float, epsilon: float) -> Callable[[torch.nn.Module, object], torch.Tensor]:
    """The loss of one batch for :func:`bkdattr.inject.train.train_lora`: the LM loss on the clean embeddings
    plus ``alpha`` times the consistency loss on the adversarially perturbed ones (module docstring)."""

    def loss(model: torch.nn.Module, batch) -> torch.Tensor:
        body, _head = body_and_head(model)
        kw = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids, "use_cache": False,
              "output_hidden_states": True}
        emb = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)  # [B, T, d]
        out = body(inputs_embeds=emb, **kw)
        lm = reply_loss(model, out.last_hidden_state, batch)
        if alpha == 0:
            return lm
        cons = consistency_loss(out.hidden_states, batch.attention_mask)
        (grad,) = torch.autograd.grad(cons, emb, retain_graph=True)  # [B, T, d]: where consistency breaks fastest
        rms = emb.detach().float().pow(2).mean(-1, keepdim=True).sqrt()  # [B, T, 1]
        delta = (epsilon * rms * grad.sign()).to(emb.dtype)
        out_adv = body(inputs_embeds=emb.detach() + delta, **kw)
        return lm + alpha * consistency_loss(out_adv.hidden_states, batch.attention_mask)

    return loss
