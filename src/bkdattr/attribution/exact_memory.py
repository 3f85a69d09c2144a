"""Memory of the exact BAHA sweep: how much GPU memory it needs, and the batch that fits.

:func:`exact_sweep_bytes` estimates the peak GPU memory of the exact sweep from the model's shapes (the formula is
in docs/METHOD.md, "GPU memory of the exact sweep"); :func:`suggest_exact_batch` picks the largest
``heads_per_pass`` and ``batch_size`` that fit a free-memory budget; :func:`plan_exact` does both for a loaded
model and its prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..core.prompts import render_prompt, target_ids

#: share of the free memory a suggestion may plan to use (the rest: allocator fragmentation, cuBLAS workspaces)
MEMORY_HEADROOM = 0.85
GIB = 1024**3


@dataclass
class ExactMemory:
    """Estimated peak memory (bytes) of an exact sweep and its parts."""

    weights: int
    prefix_cache: int
    replay_kv: int
    activations: int
    total: int

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in asdict(self).items()}


def exact_sweep_bytes(n_layers: int, n_heads: int, d_model: int, n_kv_heads: int, d_head: int, prompt_len: int,
                      target_len: int, dtype_bytes: int, *, batch: int, heads_per_pass: int,
                      n_params: int | None = None, vocab: int = 32000, d_ff: int | None = None) -> ExactMemory:
    """Peak bytes of the ``layers`` exact strategy for a batch of ``batch`` prompts of ``prompt_len`` tokens and
    ``target_len`` target tokens, ``heads_per_pass`` heads patched per pass (R), in a ``dtype_bytes`` dtype.

    * weights: ``n_params * dtype_bytes`` (``n_params`` estimated from the shapes when not given);
    Every patched pass runs ``B (R+1)`` rows: the ``R`` patched heads and a zero-patch replica of each prompt
    (``ChunkRunner.patched_and_base``).

    * prefix cache: K and V of every layer for the ``B`` prompts (``PrefixCache.build``) and its copy tiled to
      the ``B (R+1)`` rows (``PrefixCache.tiled``): ``2 L B (R+2) P kv d_h bytes``;
    * KV growth in the replay: each replayed layer concatenates the ``T`` suffix columns to a new copy of its
      cache, ``2 L B (R+1) (P + T) kv d_h bytes``, plus the recorded clean layer inputs and arguments
      ``L B T d`` (held once, not replicated);
    * activations of one layer call on ``B (R+1) T`` rows (attention scores ``B (R+1) H T (P+T)`` in float32,
      MLP ``B (R+1) T d_ff``) and the LM head on those rows (logits in float32, chunked to 512 rows).

    Checked against the measured peak on the embedded model (``benchmarks/bench_memory.py``)."""
    L, H, d, kv, dh, P, T = n_layers, n_heads, d_model, n_kv_heads, d_head, prompt_len, target_len
    rows = batch * (heads_per_pass + 1)
    d_ff = d_ff or int(8 * d / 3 / 256 + 0.999) * 256
    if n_params is None:
        per_layer = d * H * dh + 2 * d * kv * dh + H * dh * d + 3 * d * d_ff
        n_params = L * per_layer + 2 * vocab * d
    weights = n_params * dtype_bytes
    prefix = 2 * L * (batch + rows) * P * kv * dh * dtype_bytes
    replay = 2 * L * rows * (P + T) * kv * dh * dtype_bytes + L * batch * T * d * dtype_bytes
    scores = rows * H * T * (P + T) * 4
    act = scores + rows * T * (4 * d + 3 * d_ff) * dtype_bytes + min(rows * T, 512) * vocab * 4
    total = weights + prefix + replay + act
    return ExactMemory(int(weights), int(prefix), int(replay), int(act), int(total))


@dataclass
class ExactSuggestion:
    """What :func:`suggest_exact_batch` picked: ``batch_size``, ``heads_per_pass``, the estimate, and whether even
    ``batch_size=1, heads_per_pass=1`` fits (``fits=False``: the weights alone are too big)."""

    batch_size: int
    heads_per_pass: int
    memory: ExactMemory
    fits: bool


def suggest_exact_batch(L: int, H: int, d: int, kv_heads: int, d_head: int, prompt_len: int, target_len: int,
                        dtype_bytes: int, free_bytes: int, *, max_batch: int = 8, n_params: int | None = None,
                        vocab: int = 32000, d_ff: int | None = None) -> ExactSuggestion:
    """The ``heads_per_pass`` (``H`` or a power of two below it) and ``batch_size`` (up to ``max_batch``)
    whose estimated peak (:func:`exact_sweep_bytes`) stays within ``MEMORY_HEADROOM`` of ``free_bytes``: the
    most rows per pass (``batch_size * heads_per_pass``); on a tie the larger ``heads_per_pass``
    (fewer replications of the prefix cache per layer)."""
    budget = free_bytes * MEMORY_HEADROOM

    def need(b: int, r: int) -> ExactMemory:
        return exact_sweep_bytes(L, H, d, kv_heads, d_head, prompt_len, target_len, dtype_bytes, batch=b,
                                 heads_per_pass=r, n_params=n_params, vocab=vocab, d_ff=d_ff)

    best: ExactSuggestion | None = None
    per_pass = sorted({H, *(x for x in (16, 8, 4, 2, 1) if x < H)}, reverse=True)
    for b in range(max_batch, 0, -1):
        for r in per_pass:
            m = need(b, r)
            if m.total <= budget and (best is None or b * r > best.batch_size * best.heads_per_pass):
                best = ExactSuggestion(b, r, m, True)  # ties keep the larger heads_per_pass (tried first)
    return best or ExactSuggestion(1, 1, need(1, 1), False)


def plan_exact(lm, prompts, targets, batch_size: int, heads_per_pass: int | None,
               free_bytes: int) -> tuple[int, int | None, dict]:
    """``(batch_size, heads_per_pass, plan)`` for an exact sweep of ``lm`` on ``prompts``/``targets`` within
    ``free_bytes`` (free GPU memory *plus* the bytes of the loaded weights). ``heads_per_pass=None`` asks for a
    suggestion (and may lower ``batch_size``); a value the caller set is kept, with the estimate in ``plan``."""
    tok, a = lm.tokenizer, lm.arch
    P = max(len(tok(render_prompt(tok, p), add_special_tokens=False).input_ids) for p in prompts)
    T = max(len(target_ids(tok, t)) for t in targets)
    n_params = sum(p.numel() for p in lm.model.parameters())
    vocab = int(getattr(lm.model.config, "vocab_size", 32000))
    size = _dtype_bytes(lm.dtype)
    if heads_per_pass is None:
        s = suggest_exact_batch(a.n_layers, a.n_heads, a.d_model, a.n_kv_heads, a.d_head, P, T, size, free_bytes,
                                max_batch=batch_size, n_params=n_params, vocab=vocab)
        batch_size, heads_per_pass, mem = s.batch_size, s.heads_per_pass, s.memory
    else:
        mem = exact_sweep_bytes(a.n_layers, a.n_heads, a.d_model, a.n_kv_heads, a.d_head, P, T, size,
                                batch=batch_size, heads_per_pass=heads_per_pass, n_params=n_params, vocab=vocab)
    plan = {"prompt_tokens": P, "target_tokens": T, "free_gib": round(free_bytes / GIB, 2),
            "estimate_gib": mem.gib(), "batch_size": batch_size, "heads_per_pass": heads_per_pass,
            "fits": mem.total <= free_bytes * MEMORY_HEADROOM}
    return batch_size, heads_per_pass, plan


def _dtype_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
