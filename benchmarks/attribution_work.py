"""Arithmetic of the three BAHA methods: multiply-accumulates (MACs) counted from the model's shapes.

Used by ``bench_attribution.py`` to put wall-clock figures next to what they can be at best: the work of
each method on the actual padded batches (linear layers and the LM head; attention scores, norms and
activations are left out -- a few per cent here), the ratio of the work of two methods (a hardware-free
ceiling for their speed ratio at equal efficiency), and the time the work takes at a measured matmul rate.

Per prompt chunk of ``B`` rows, prompt width ``W`` (``p(x)`` is column ``W-1``), target width ``T``, ``L``
layers, ``c`` = MACs per token of one decoder layer and ``v`` = MACs per token of the LM head:

* reference, per head: ``B (W' L c + W' v)`` -- every position of the right-padded ``W'``-wide batch;
* exact, per head of layer ``l``, all metrics: ``B ((L-l-1) T c + c + T v)`` (layer ``l`` runs on ``p(x)``
  alone); first-token score only: ``B ((L-l) c + v)``; once per chunk: the prefix ``B (W-1) L c`` and the
  clean suffix ``B T (L c + v)``;
* attribution: the prefix ``B (W-1) L c`` without autograd, the suffix ``B T (L c + v)`` forward, and one
  backward per score through it (input gradients only, ~ the forward's work): 2 (all metrics) or 1
  (first-token only).
"""

from __future__ import annotations

import time

import torch


def layer_macs(arch) -> int:
    """MACs per token of one decoder layer: the 2-D weights of its linear maps (``nn.Linear``, GPT-2 Conv1D)."""
    return sum(p.numel() for n, p in arch.layers[0].named_parameters() if p.dim() == 2 and "weight" in n)


def head_macs(arch) -> int:
    w = arch.lm_head.weight
    return int(w.shape[0] * w.shape[1])


def count(lm, prompts, targets, heads, batch_size: int) -> dict:
    """MACs of each method on these prompts and heads (see the module docstring)."""
    from bkdattr.attribution.scores import encode_aligned
    from bkdattr.attribution.sweep import chunks_of
    from bkdattr.core.prompts import encode_with_targets

    arch = lm.arch
    c, v, n_layers = layer_macs(arch), head_macs(arch), arch.n_layers
    out = dict.fromkeys(("reference", "exact", "exact_first_token", "attribution", "attribution_first_token"), 0)
    for idx in chunks_of(lm, prompts, batch_size):
        p, t = [prompts[i] for i in idx], [targets[i] for i in idx]
        a = encode_aligned(lm.tokenizer, p, t)
        b, w, tw = a.size, a.prompt_width, a.target_width
        full_w = encode_with_targets(lm.tokenizer, p, t).input_ids.shape[1]
        prefix, suffix = b * (w - 1) * n_layers * c, b * tw * (n_layers * c + v)
        out["exact"] += prefix + suffix
        out["exact_first_token"] += prefix + b * (n_layers * c + v)
        out["attribution"] += prefix + 3 * suffix
        out["attribution_first_token"] += prefix + 2 * b * (n_layers * c + v)
        for layer, _h in heads:
            out["reference"] += b * full_w * (n_layers * c + v)
            out["exact"] += b * ((n_layers - layer - 1) * tw * c + c + tw * v)
            out["exact_first_token"] += b * ((n_layers - layer) * c + v)
    return out


def matmul_rate(d_in: int, d_out: int, rows: int = 512, seconds: float = 1.0) -> float:
    """Measured float32 ``[rows, d_in] x [d_in, d_out]`` rate on this machine, in GMAC/s (best of 3 runs)."""
    x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
    torch.nn.functional.linear(x, w)
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            torch.nn.functional.linear(x, w)
            n += 1
        best = max(best, n * rows * d_in * d_out / (time.perf_counter() - t0) / 1e9)
    return best
