"""``disarm --strategy fine_pruning``: the fine-pruning baseline (Liu, Dolan-Gavitt and Garg, "Fine-Pruning:
Defending Against Backdooring Attacks on Deep Neural Networks", RAID 2018), adapted to a decoder LM.

Liu et al. observe that a backdoor tends to live in neurons that clean inputs leave dormant: they prune the last
convolutional layer's neurons in increasing order of their mean activation on clean inputs, then fine-tune the
pruned network on clean data, which also repairs what pruning cost and erodes a backdoor that survived it. Here
the neurons are the MLP's hidden units (the input of each layer's MLP output projection, ``[B, T, d_ff]``):

1. **Activity** (:func:`mlp_activity`): the mean absolute activation of every neuron of the last
   ``prune_layers`` layers over every real token of ``n_clean`` held-in clean prompts (absolute, because gated
   MLPs such as SwiGLU give signed activations where the paper's ReLUs gave non-negative ones).
2. **Prune** (:func:`prune_plan`, :func:`prune_neurons`): in each of those layers the ``prune_share`` least active
   neurons; a pruned neuron's column of the MLP output projection is zeroed, so it writes nothing.
3. **Fine-tune** on the clean rows (the same rows and LoRA settings as the repair's clean part), with no adapter on
   the MLP output projection where the architecture names it apart from the attention's, and the pruned columns
   zeroed again after the merge, so the pruned neurons stay pruned.

No trigger is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ..core.arch import Arch, is_conv1d
from ..core.forward import body_and_head
from ..core.hooks import tap
from ..core.prompts import encode_prompts


def default_prune_layers(n_layers: int) -> int:
    """How many of the last layers are pruned by default: a quarter of them, at least one."""
    return max(1, n_layers // 4)


@torch.no_grad()
def mlp_activity(lm, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 16) -> dict[int, torch.Tensor]:
    """``{layer: [d_ff]}`` float32: each MLP neuron's mean absolute activation over every real token of the chat
    prompts ``prompts`` (left padded; padding excluded)."""
    body, _head = body_and_head(lm.model)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    def add(layer: int, mask: torch.Tensor):
        def fn(x: torch.Tensor) -> None:  # x: [B, T, d_ff]
            s = x[mask.to(x.device)].float().abs().sum(0)
            sums[layer] = s if layer not in sums else sums[layer] + s
        return fn

    for i in range(0, len(prompts), batch_size):
        b = encode_prompts(lm.tokenizer, list(prompts[i:i + batch_size])).to(lm.device)
        mask = b.attention_mask.bool()  # [B, T]
        with contextlib.ExitStack() as stack:  # one tap per pruned layer's MLP output projection (its input)
            for layer in layers:
                stack.enter_context(tap(lm.arch.mlp_out(layer), add(layer, mask), pre=True))
            body(**b.model_inputs())
        count += int(mask.sum())
    return {layer: s / max(1, count) for layer, s in sums.items()}


def prune_plan(activity: dict[int, torch.Tensor], share: float) -> dict[int, list[int]]:
    """``{layer: neuron indices}``: the ``round(share * d_ff)`` least active neurons of each layer (at least
    one), least active first."""
    out = {}
    for layer, a in activity.items():
        n = max(1, round(share * a.numel()))
        out[layer] = a.argsort()[:n].tolist()
    return out


@torch.no_grad()
def prune_neurons(arch: Arch, plan: dict[int, list[int]]) -> None:
    """Zero each planned neuron's column of its layer's MLP output projection (in place; GPT-2's Conv1D stores
    it as a row)."""
    for layer, idx in plan.items():
        m = arch.mlp_out(layer)
        m = getattr(m, "base_layer", m)
        ix = torch.as_tensor(idx, dtype=torch.long, device=m.weight.device)
        if is_conv1d(m):
            m.weight[ix, :] = 0.0
        else:
            m.weight[:, ix] = 0.0


def mlp_out_name(arch: Arch) -> str:
    """The leaf name of the MLP output projection (``down_proj``, ``c_proj``, ...)."""
    m = arch.mlp_out(0)
    return next(name.rsplit(".", 1)[-1] for name, mod in arch.layers[0].named_modules() if mod is m)
