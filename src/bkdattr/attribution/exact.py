"""Exact per-head CIE, fast: the numbers of one full forward pass per head, without most of the work.

The reference semantics (:mod:`bkdattr.attribution.reference`) run the whole model once per head: add
``abar_{l,h} - a_{l,h}(x)`` to layer ``l``'s attention output at ``p(x)`` and score the teacher-forced
target. Almost all of that pass is the same for every head:

1. **Prefix cache.** Tokens before ``p(x)`` cannot see the patch (causal attention), so the prefix
   ``[0, p(x))`` runs once per prompt chunk and its KV cache is reused. Prompts are left-padded and targets
   right-padded (:func:`bkdattr.attribution.scores.encode_aligned`), so ``p(x)`` is the same column in every
   row and the *suffix* -- ``p(x)`` and the target tokens that predict the rest of the target -- is a
   rectangle of ``T`` columns.
2. **Start at the patched layer.** Layers below ``l`` are unchanged for the suffix too. One clean suffix
   pass records, with forward pre-hooks (``with_kwargs=True``), the hidden states entering every decoder layer
   and the exact arguments the model passes to it (attention mask, rotary embeddings, position ids, cache).
   A patched run for a head of layer ``l`` then calls layers ``l .. L-1`` directly on the recorded input of
   layer ``l``, followed by the final norm and the LM head. Layer ``l`` itself only runs on column ``p(x)``:
   later positions attend to keys/values computed from layer ``l``'s (unchanged) input and never see the
   patched attention output there, so their layer-``l`` outputs are the clean ones (recorded); a second
   clean pass over column ``p(x)`` alone records the arguments of a one-column call.
3. **Several heads at once.** The batch is replicated once per head of the layer (row ``b*R + r`` is prompt
   ``b`` patched at head ``r``); the cache and every batch-shaped argument are repeated to match. After each
   run the cache layers are reset to the prefix (their state is snapshotted; updates concatenate, so the
   prefix tensors themselves are never written).
4. **Target positions only.** The LM head runs on the ``sum_b T_b`` rows that predict target tokens
   (only on ``p(x)`` when the first-token score alone is asked for: then the suffix is one column).

Strategies, fastest first: ``layers`` (all four steps), ``prefix`` (steps 1, 3, 4: the model's own forward on
the suffix with the prefix cache) and ``full`` (step 3 only: full passes, replicated). ``auto`` takes
``layers`` and checks it on the first chunk: an unpatched replicated replay must reproduce the clean
log-probabilities of the model's own forward, and the cached suffix pass must reproduce a full pass without
cache. If an architecture fails a check (e.g. it post-processes logits in a way the replay does not know),
the next strategy is used and a warning names the reason; the strategy used is recorded in the result.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.compat import cache_kwargs
from ..core.distributed import is_main
from ..core.errors import ConfigError
from ..core.forward import PrefixCache, backbone, keep_logits_kwargs, restored
from ..core.hooks import (
    HiddenStatesNotFound,
    LayerCall,
    add_to_attention_output,
    capture_contributions,
    capture_layer_calls,
    tap,
)
from ..core.models import input_device
from ..core.runner import run_units
from ..core.scoring import token_logprobs
from .scores import METRICS, AlignedBatch, cie_from_logprobs, encode_aligned, metrics_from_logprobs
from .sweep import Sweep, assemble, check_inputs, chunks_of, head_groups, new_table, stack_metrics

STRATEGIES = ("auto", "layers", "prefix", "full")
#: max rows sent through the LM head at once (bounds the [rows, vocab] logits buffer)
_HEAD_ROWS = 512


class ReplayMismatch(RuntimeError):
    """A fast strategy does not reproduce the model on this architecture (its self-check failed, or the model
    does not expose what the replay needs). The only exception that makes ``auto`` fall back to a slower
    strategy: any other error in a fast path is a bug and propagates."""


def _is_cache(x) -> bool:
    try:
        from transformers.cache_utils import Cache  # lazy: absent from older transformers (the except below)
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Cache)


def _expand(x, batch: int, reps: int, cache):
    """Repeat every batch-shaped tensor (``ndim >= 2``, leading dim ``batch``) ``reps`` times row-wise
    (``repeat_interleave``), swap any cache object for ``cache``; recurse into tuples, lists and dicts."""
    if _is_cache(x):
        return cache
    if isinstance(x, torch.Tensor):
        if x.dim() >= 2 and x.shape[0] == batch and reps > 1:
            return x.repeat_interleave(reps, dim=0)
        return x
    if isinstance(x, tuple):
        return tuple(_expand(v, batch, reps, cache) for v in x)
    if isinstance(x, list):
        return [_expand(v, batch, reps, cache) for v in x]
    if isinstance(x, dict):
        return {k: _expand(v, batch, reps, cache) for k, v in x.items()}
    return x


@dataclass
class _Replicated:
    cache: object
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    args1: list[tuple] = field(default_factory=list)  # the one-column (``p(x)`` only) calls
    kwargs1: list[dict] = field(default_factory=list)


class ChunkRunner:
    """One chunk of prompts, prepared once; patched target log-probabilities on demand.

    ``batch`` is an :class:`AlignedBatch` (target columns already truncated to what the metrics need).
    After :meth:`prepare`: ``clean_lp [B, T]`` (the model's own forward), ``contrib[l] [B, H, d]`` (clean
    per-head contributions at ``p(x)``). :meth:`patched_logprobs` returns ``[B*R, T]``.
    """

    def __init__(self, lm, batch: AlignedBatch, strategy: str = "layers"):
        if strategy not in ("layers", "prefix", "full"):
            raise ConfigError(f"unknown exact strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
        self.lm, self.arch, self.model = lm, lm.arch, lm.model
        self.batch = batch
        self.strategy = strategy if batch.prompt_width >= 2 else "full"
        self.dev = input_device(self.model)
        self.B, self.W, self.T = batch.size, batch.prompt_width, batch.target_width
        self._rep: dict[int, _Replicated] = {}
        self.calls: list[LayerCall | None] = []
        self.calls1: list[LayerCall | None] = []  # layer calls of a clean pass over column p(x) alone (T > 1)
        self.last_out: torch.Tensor | None = None  # clean output of the last decoder layer [B, T, d]
        self.cache = None
        self._head32: tuple | None = None  # float32 copy of a half-precision LM head (weight, bias)

    # ---- clean passes ---------------------------------------------------------------------------------
    def _suffix_inputs(self, reps: int = 1, width: int | None = None, full: bool = False) -> dict[str, torch.Tensor]:
        """Columns ``[W-1, W-1+width)`` (``full``: from column 0; the mask always is), rows repeated ``reps``
        times, on the input device."""
        b, end = self.batch, self.W - 1 + (width or self.T)
        start = 0 if full else self.W - 1
        out = {"input_ids": b.input_ids[:, start:end], "attention_mask": b.attention_mask[:, :end],
               "position_ids": b.position_ids[:, start:end]}
        return {k: v.repeat_interleave(reps, 0).to(self.dev) for k, v in out.items()}

    @torch.no_grad()
    def prepare(self) -> ChunkRunner:
        """Run the prefix (KV cache) and the clean suffix; record layer inputs/arguments, contributions and
        the clean target log-probs."""
        try:
            return self._prepare()
        except HiddenStatesNotFound as e:
            raise ReplayMismatch(str(e)) from None

    def _prepare(self) -> ChunkRunner:
        zeros = torch.zeros(self.B, dtype=torch.long)
        if self.strategy == "full":
            with capture_contributions(self.arch, zeros + (self.W - 1)) as contrib:
                logits = self.model(**self._suffix_inputs(full=True), use_cache=False,
                                    **keep_logits_kwargs(self.model, self.T)).logits[:, -self.T:]
            self.contrib = {k: v.cpu() for k, v in contrib.items()}
            self.clean_lp = self._lp_from_logits(logits, 1)
            return self
        b, w = self.batch, self.W
        self.prefix = PrefixCache.build(self.model, b.input_ids[:, : w - 1], b.attention_mask[:, : w - 1],
                                        b.position_ids[:, : w - 1])
        if self.prefix is None:
            raise ReplayMismatch("the model returned no KV cache")
        if getattr(self.prefix.cache, "layers", None) is None:
            raise ReplayMismatch("the KV cache has no per-layer objects (transformers < 4.56?)")
        self.cache = self.prefix.cache
        last: list[torch.Tensor] = []

        def keep_last(out: torch.Tensor) -> None:
            if not last:
                last.append(out)

        with restored(self.cache), capture_layer_calls(self.arch.layers) as calls, \
                capture_contributions(self.arch, zeros) as contrib, tap(self.arch.layers[-1], keep_last):
            logits = self.model(**self._suffix_inputs(), use_cache=True, **cache_kwargs(self.model, self.cache)).logits
        if any(c is None for c in calls) or not last:
            raise ReplayMismatch("some decoder layers were not called in the suffix pass")
        self.calls, self.last_out = list(calls), last[0]
        if self.T > 1:
            # the arguments of a call on column p(x) alone (mask, rotary embeddings, positions for one column):
            # the patched layer itself only needs recomputing there (see patched_logprobs)
            with restored(self.cache), capture_layer_calls(self.arch.layers) as calls1:
                backbone(self.model)(**self._suffix_inputs(width=1), use_cache=True,
                                     **cache_kwargs(self.model, self.cache))
            if any(c is None for c in calls1):
                raise ReplayMismatch("some decoder layers were not called in the one-column suffix pass")
            self.calls1 = list(calls1)
        self.contrib = {k: v.cpu() for k, v in contrib.items()}
        self.clean_lp = self._lp_from_logits(logits, 1)
        return self

    # ---- scoring ----------------------------------------------------------------------------------------
    def _rows(self, reps: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.batch.target_mask.repeat_interleave(reps, 0)
        ids = self.batch.target_ids.repeat_interleave(reps, 0)
        return mask, ids[mask]

    def _lp_from_logits(self, logits: torch.Tensor, reps: int) -> torch.Tensor:
        """``logits [B*R, T, V]`` at the suffix positions -> target log-probs ``[B*R, T]`` (0 where masked)."""
        mask, ids = self._rows(reps)
        lp = torch.zeros(mask.shape, dtype=torch.float32)
        lp[mask] = token_logprobs(logits[mask.to(logits.device)], ids).cpu()
        return lp

    def _lp_from_hidden(self, hidden: torch.Tensor, reps: int) -> torch.Tensor:
        """Last-layer output ``[B*R, T, d]`` -> final norm -> LM head on target rows -> ``[B*R, T]``."""
        mask, ids = self._rows(reps)
        rows = hidden[mask.to(hidden.device)]
        # no device is read from parameters (``meta`` under offloading): the rows stay where the last layer
        # put them, as in the model's own forward (accelerate's hooks move them where a module runs)
        norm, head = self.arch.final_norm, self.arch.lm_head
        rows = norm(rows)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        w = getattr(head, "weight", None)
        if self._head32 is None and isinstance(head, torch.nn.Linear) and w.dtype != torch.float32 \
                and w.device.type != "meta":  # the LM head in float32: bf16 rounds logits by ~0.01-0.1 nats
            self._head32 = (w.float(), None if head.bias is None else head.bias.float())
        out = []
        for s in range(0, rows.shape[0], _HEAD_ROWS):
            if self._head32 is not None:
                w32, b32 = self._head32
                logits = torch.nn.functional.linear(rows[s:s + _HEAD_ROWS].float().to(w32.device), w32, b32)
            else:
                logits = head(rows[s:s + _HEAD_ROWS])
            if cap:
                logits = torch.tanh(logits.float() / cap) * cap
            out.append(token_logprobs(logits, ids[s:s + _HEAD_ROWS]).cpu())
        lp = torch.zeros(mask.shape, dtype=torch.float32)
        lp[mask] = torch.cat(out) if out else torch.zeros(0)
        return lp

    # ---- patched runs -----------------------------------------------------------------------------------
    def _replicated(self, reps: int) -> _Replicated:
        if reps not in self._rep:
            cache = self.prefix.tiled(reps)
            rep = _Replicated(cache)
            for call in self.calls:
                rep.args.append(_expand(call.args, self.B, reps, cache))
                rep.kwargs.append(_expand(call.kwargs, self.B, reps, cache))
            for call in self.calls1:
                rep.args1.append(_expand(call.args, self.B, reps, cache))
                rep.kwargs1.append(_expand(call.kwargs, self.B, reps, cache))
            self._rep = {reps: rep}  # keep one replication at a time (memory)
        return self._rep[reps]

    def _edit(self, layer: int, delta: torch.Tensor | None, reps: int, col: int):
        if delta is None:
            return contextlib.nullcontext()
        pos = torch.full((self.B * reps,), col, dtype=torch.long)
        return add_to_attention_output(self.arch, {layer: delta}, pos)

    @torch.no_grad()
    def patched_logprobs(self, layer: int, delta: torch.Tensor | None, reps: int,
                         strategy: str | None = None) -> torch.Tensor:
        """Target log-probs ``[B*R, T]`` with ``delta [B*R, d]`` (row ``b*R + r``) added to layer ``layer``'s
        attention output at ``p(x)``; ``delta=None`` gives the unpatched replicated run."""
        strategy = strategy or self.strategy
        if strategy == "full":
            with self._edit(layer, delta, reps, self.W - 1):
                logits = self.model(**self._suffix_inputs(reps, full=True), use_cache=False,
                                    **keep_logits_kwargs(self.model, self.T)).logits[:, -self.T:]
            return self._lp_from_logits(logits, reps)
        rep = self._replicated(reps)
        if strategy == "prefix":
            with restored(rep.cache), self._edit(layer, delta, reps, 0):
                logits = self.model(**self._suffix_inputs(reps), use_cache=True,
                                    **cache_kwargs(self.model, rep.cache)).logits
            return self._lp_from_logits(logits, reps)
        with restored(rep.cache), self._edit(layer, delta, reps, 0):
            if self.T > 1 and self.calls1:
                # Layer ``layer`` itself: positions after p(x) attend to K/V of the (unchanged) layer input and
                # never see the patched attention output, so their outputs are the clean ones; only column
                # p(x) runs (attention + MLP after the patch), on the one-column call's arguments.
                call1 = self.calls1[layer]
                h0 = call1(self.arch.layers[layer], call1.hidden.repeat_interleave(reps, 0), rep.args1[layer],
                           rep.kwargs1[layer])
                after = self.calls[layer + 1].hidden if layer + 1 < self.arch.n_layers else self.last_out
                after = after[:, 1:].repeat_interleave(reps, 0)
                h = torch.cat([h0, after.to(h0.device)], dim=1)
                start = layer + 1
            else:
                h, start = self.calls[layer].hidden.repeat_interleave(reps, 0), layer
            for j in range(start, self.arch.n_layers):
                h = self.calls[j](self.arch.layers[j], h, rep.args[j], rep.kwargs[j])
        return self._lp_from_hidden(h, reps)

    def patched_and_base(self, layer: int, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target log-probs ``[B*R, T]`` with ``delta [B, R, d]`` added (row ``b*R + r``) and those of a zero-patch
        replica of each prompt from the same replay (the same code path and batch, so a zero patch gives a CIE
        of exactly 0 in every dtype): one run over ``B*(R+1)`` rows, replica first."""
        b, r, d = delta.shape
        rows = torch.cat([torch.zeros(b, 1, d, dtype=torch.float32), delta.float()], 1).reshape(-1, d)
        lp = self.patched_logprobs(layer, rows, r + 1).reshape(b, r + 1, -1)
        return lp[:, 1:].reshape(b * r, -1), lp[:, :1].expand(-1, r, -1).reshape(b * r, -1)

    # ---- self-check -------------------------------------------------------------------------------------
    def tolerance(self) -> float:
        """Structural check only (a wrong replay is off by O(1) nats): the CIE subtracts a replica from the same
        replay, not the clean forward."""
        return 1e-4 if self.lm.dtype == torch.float32 else 0.25

    @torch.no_grad()
    def check(self, strategy: str) -> float:
        """Max |log-prob difference| between an unpatched replicated run of ``strategy`` and the clean forward;
        for cached strategies also between the cached suffix pass and a full pass. Raises
        :class:`ReplayMismatch` above :meth:`tolerance`."""
        mask = self.batch.target_mask
        worst = 0.0
        if strategy in ("layers", "prefix"):
            if strategy == "layers" and (self.arch.final_norm is None or self.arch.lm_head is None):
                raise ReplayMismatch("no final norm / LM head found for the layer replay")
            # the cached suffix pass vs one full pass without cache, on the first row (cheap)
            row = {k: v[:1] for k, v in self._suffix_inputs(full=True).items()}
            full = self.model(**row, use_cache=False, **keep_logits_kwargs(self.model, self.T)).logits[0, -self.T:]
            m0 = mask[0]
            lp0 = token_logprobs(full[m0.to(full.device)], self.batch.target_ids[0][m0]).cpu()
            worst = float((lp0 - self.clean_lp[0][m0]).abs().max())
            if worst > self.tolerance():
                raise ReplayMismatch(f"cached suffix pass differs from a full pass by {worst:.2e}")
        rep_lp = self.patched_logprobs(0, None, 2, strategy)
        diff = float((rep_lp - self.clean_lp.repeat_interleave(2, 0))[mask.repeat_interleave(2, 0)].abs().max())
        worst = max(worst, diff)
        if not diff <= self.tolerance():
            raise ReplayMismatch(f"replicated {strategy} replay differs from the clean pass by {diff:.2e}")
        return worst


def choose_strategy(runner: ChunkRunner, wanted: str) -> tuple[str, float, str | None]:
    """Validate ``wanted`` (``auto`` tries ``layers``, then ``prefix``, then ``full``) on a prepared runner.
    Returns ``(strategy, max check difference, reason for a fallback or None)``."""
    order = ["layers", "prefix", "full"] if wanted == "auto" else [wanted]
    if runner.strategy == "full":
        order = ["full"]
    reasons = []
    for s in order:
        try:
            return s, runner.check(s), ("; ".join(reasons) or None)
        except ReplayMismatch as e:
            reasons.append(f"{s}: {e}")
            if wanted != "auto":
                raise ConfigError(f"exact strategy '{wanted}' does not work on this model ({e}); use auto") from None
    raise ConfigError(f"no exact strategy works on this model ({'; '.join(reasons)}); use method=reference")


def warn_fallback(strategy: str, reason: str) -> None:
    warnings.warn(f"exact attribution: using the slower '{strategy}' strategy ({reason})", stacklevel=3)


def _head_cost(arch) -> float:
    """LM-head work in units of one decoder layer's work (parameter counts), for load balancing."""
    layer_params = sum(p.numel() for p in arch.layers[0].parameters()) or 1
    head = arch.lm_head
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    return head_params / layer_params


def exact_sweep(lm, prompts: Sequence[str], targets: Sequence[str], abar: torch.Tensor,
                heads: Sequence[tuple[int, int]], *, batch_size: int = 8, metrics: Sequence[str] | None = None,
                strategy: str = "auto", heads_per_pass: int | None = None, progress: bool = True,
                checkpoint=None, checkpoint_key: str = ""):
    """Exact CIE of ``heads`` (list of ``(layer, head)``) on every prompt: see the module docstring.

    ``abar [L, H, d]``; ``metrics``: the scores to compute (default all; asking for
    ``first_token_logprob`` alone makes the suffix one column). Returns a :class:`~.sweep.Sweep`. Under
    torch.distributed the (chunk, head group) units are sharded and the result gathered (identical).
    ``checkpoint``: a file path to save finished units to (resumed when ``checkpoint_key`` matches)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown exact strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
    wanted = tuple(metrics or METRICS)
    check_inputs(lm, prompts, targets, abar, heads, batch_size)
    arch = lm.arch
    first_only = set(wanted) == {"first_token_logprob"}
    chunks = chunks_of(lm, prompts, batch_size)
    groups = head_groups(heads, heads_per_pass)
    hc = _head_cost(arch)
    units = [(c, g) for c in range(len(chunks)) for g in range(len(groups))]
    costs = [len(chunks[c]) * len(groups[g][1]) * (arch.n_layers - groups[g][0] + hc) for c, g in units]
    n = len(prompts)
    st: dict = {"chosen": None, "diff": None, "reason": None}

    def prepare(c: int):
        """The chunk's runner (strategy chosen and checked on chunk 0, prepared first on every rank)."""
        idx = chunks[c]
        batch = encode_aligned(lm.tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
        if first_only:
            batch = batch.truncate_targets(1)
        try:
            runner = ChunkRunner(lm, batch, st["chosen"] or ("layers" if strategy == "auto" else strategy)).prepare()
        except ReplayMismatch as e:
            if strategy not in ("auto", "full"):
                raise ConfigError(f"exact strategy '{strategy}' does not work on this model ({e}); use auto") from None
            runner = ChunkRunner(lm, batch, "full").prepare()
            st["reason"] = str(e)
        if st["chosen"] is None:
            st["chosen"], st["diff"], why = choose_strategy(runner, strategy if runner.strategy != "full" else "full")
            st["reason"] = "; ".join(x for x in (st["reason"], why) if x) or None
            if st["reason"] and is_main():
                warn_fallback(st["chosen"], st["reason"])
        if runner.strategy != "full":
            runner.strategy = st["chosen"]
        return runner, stack_metrics(metrics_from_logprobs(runner.clean_lp, batch.target_mask), wanted)  # [B, M]

    def work(state, u: int) -> torch.Tensor:
        runner, clean = state
        layer, hidx = groups[units[u][1]]
        hs = [heads[i][1] for i in hidx]
        delta = abar[layer, hs].float()[None] - runner.contrib[layer][:, hs]  # [B, R, d]
        lp, base = runner.patched_and_base(layer, delta)
        cie = stack_metrics(cie_from_logprobs(lp, base, runner.batch.target_mask.repeat_interleave(len(hs), 0)),
                            wanted)
        return torch.cat([clean[:, None], cie.reshape(runner.B, len(hs), -1)], dim=1)  # [B, 1 + R, M]

    table = new_table(len(units), batch_size, max(len(g[1]) for g in groups))
    table, run_info = run_units(
        [c for c, _ in units], costs, table, work, prepare, always=(0,), checkpoint=checkpoint,
        checkpoint_key=checkpoint_key, weights=[len(groups[g][1]) * len(chunks[c]) / n for c, g in units],
        progress=progress, desc="BAHA exact", unit="head",
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} heads [{elapsed}<{remaining}]")
    clean_d, cie_d = assemble(table, [(chunks[c], groups[g][1]) for c, g in units], n, len(heads))
    info = {"strategy": st["chosen"], "check_max_abs_diff": st["diff"], "fallback_reason": st["reason"],
            "batch_size": batch_size, "heads_per_pass": heads_per_pass, "metrics_computed": list(wanted),
            "target_columns": 1 if first_only else "all", "world_size": run_info["world_size"],
            "resumed_units": run_info["resumed_units"]}
    return Sweep(clean_d, cie_d, info)
