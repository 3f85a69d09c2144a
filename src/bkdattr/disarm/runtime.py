"""A probe-gated runtime guard: switch the backdoor off for the prompts the Backdoor Probe flags, and only those.

No weight changes. Inside ``with Guard(lm, run):`` every forward pass of the model is watched, and on the
**prefill** pass only (a call over more than one position, or over one position with an empty KV cache; decode
steps are left alone and see the edit through the KV cache, exactly as the control stage's edits):

1. **Where.** ``p(x)``, the prompt's last position, per row: the last column under left padding (generation);
   in a teacher-forced row (prompt + reply, right padded) the end of the *last* assistant header, found by its
   token ids (:attr:`bkdattr.core.template.Template.header_ids`); :meth:`Guard.at` states the positions outright.
2. **Read.** The probe's features at ``p(x)`` at layer ``L_p`` (``attn_input``: the output of the layer's input
   norm; ``residual``: the layer's input -- :mod:`bkdattr.probe.features`), float32. The probe is the guard's
   own (:mod:`bkdattr.disarm.guard_probe`: trained on the run's training prompts only, so the validation and
   test prompts stay unseen) when ``disarm --strategy guard`` has made it, else the probe stage's.
3. **Decide.** The saved probe of that layer gives ``P(triggered)`` per row; rows with ``P > threshold`` are
   flagged.
4. **Edit** the flagged rows, later in the same pass: ``action="vector"`` subtracts ``alpha * v`` (the
   Backdoor Vector of the vector stage, at its layer ``l*``) from that layer's attention output
   (``mode="subtract"``), or, with ``mode="clamp"``, removes only the excess of the attention output ``o``
   along ``u = v / |v|`` over its clean mean ``mu`` (:func:`bkdattr.disarm.calibrate.clean_projection`):
   ``o - alpha * max(0, o . u - mu) * u``, so a column where the backdoor direction is not raised is left as
   it is; ``action="heads"`` zeroes the top-k BAHA heads' slices of ``z_l`` (``k``: the smallest k of the
   ablation stage's sweep with ASR <= ``target_asr``). ``scope="prompt"`` edits ``p(x)`` of the prefill only
   (the control stage's edit; later tokens see it through the KV cache); ``scope="prefix"`` edits every prompt
   column of a flagged row up to ``p(x)`` (the reply, decoded or teacher-forced, is not edited); ``scope="all"``
   edits every column of a flagged row, on the prefill and on every decode step of the same batch (what a
   baked-in output bias does, but for the flagged prompts only). Unflagged rows are not touched at all, so a
   clean prompt's reply is bit for bit the unguarded one.

One pass suffices because the probe layer is at or before the first edited layer: when the probe's best
layer comes later, the best probe (validation accuracy, then validation loss, then the earliest) among the
layers ``<= l*`` is used, and :attr:`Guard.plan` records which and why.

The guard is built from its plan (:mod:`bkdattr.disarm.plan`, read from the run's files) and never writes a
file: the threshold is the one stored by the calibration (:mod:`bkdattr.disarm.calibrate`, run by ``bkdattr
disarm --strategy guard``) for this probe; without one, the guard calibrates on the validation split in memory
and says so in ``plan.threshold_source``.

The hooks come from :mod:`bkdattr.core.hooks` and live on module objects (:func:`~bkdattr.core.hooks.watch_calls`
on the decoder backbone finds the prefill and ``p(x)``, :func:`~bkdattr.core.hooks.tap` reads the probe layer,
:func:`~bkdattr.core.hooks.masked_edit` edits the flagged rows); they are removed on exit, even when the block
raises. They work the same around :func:`bkdattr.core.generation.generate` / ``greedy_decode``, transformers'
``model.generate`` (batched, left padded, KV cache) and teacher-forced passes. With ``scope="all"`` a decode
step is edited only when its batch has the rows of the prefill it follows (a decoder that drops finished rows
gets the prefill edit only; :attr:`Guard.n_unmapped_steps` counts such steps).

**Defaults.** ``bkdattr disarm --strategy guard`` chooses the edit (scope and scale) on the validation split
and stores it in ``RUN/disarm/guard_plan.json`` (docs/METHOD.md section 6); a guard built without explicit
``alpha`` / ``vector_layer`` / ``k`` / ``scope`` takes the stored choice for its action, else the control
stages' values and ``scope="prompt"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..control.vector import random_heads, random_like
from ..core.errors import ConfigError
from ..core.forward import backbone, past_length
from ..core.generation import generate
from ..core.hooks import check_layers, masked_edit, tap, watch_calls
from ..core.rundir import RunDir
from ..core.template import Template
from ..probe.detector import Detector
from .calibrate import MAX_FPR, calibrate_threshold, clean_projection, probe_probability, prompt_probabilities
from .config import ACTIONS, MODES, SCOPES, TARGET_ASR
from .plan import (
    PLAN_FILE,
    GuardPlan,
    heads_edit,
    load_probes,
    probe_layer_at_most,
    stored_plan,
    stored_threshold,
    threshold_key,
    vector_edit,
)

IN_MEMORY = ("calibrated on the validation split in memory (not stored: 'bkdattr disarm --strategy guard' "
             "calibrates and stores it)")


# ---- the guard -----------------------------------------------------------------------------------------------
class Guard:
    """The probe-gated guard of ``run`` on ``lm`` (the run's model); use as ``with guard: ...`` (see the module
    docstring). ``probe``: ``auto`` (the guard's own probe, trained on the training split by ``bkdattr disarm
    --strategy guard``, when it exists; else the probe stage's MLP probes), ``guard``, ``mlp`` or ``svm``;
    ``layer``: the probe layer (default: the best at or before the first edited layer);
    ``threshold``: ``P(triggered)`` above which a prompt is flagged (default: the stored validation threshold,
    else calibrated in memory); ``alpha``/``vector_layer``: the vector's scale and layer (default: the vector
    stage's); ``k``: the number of top heads (default: :func:`bkdattr.disarm.plan.disarming_k` at
    ``target_asr``); ``scope``: ``"prompt"``, ``"prefix"`` or ``"all"`` (module docstring); ``control_seed``:
    build the same-size random control instead (a random vector of the same norm, or k random heads, with this
    seed) behind the same detector; ``mode``: ``"subtract"`` or ``"clamp"`` (vector action; module docstring).
    Building a guard writes nothing."""

    def __init__(self, lm, run: RunDir | str, action: str = "vector", threshold: float | None = None,
                 layer: int | None = None, *, probe: str = "auto", alpha: float | None = None,
                 vector_layer: int | None = None, k: int | None = None, scope: str | None = None,
                 mode: str | None = None, batch_size: int = 16, use_stored_plan: bool = True,
                 control_seed: int | None = None, target_asr: float = TARGET_ASR):
        if action not in ACTIONS:
            raise ConfigError(f"unknown guard action '{action}'; use one of {', '.join(ACTIONS)}")
        if scope is not None and scope not in SCOPES:
            raise ConfigError(f"unknown guard scope '{scope}'; use one of {', '.join(SCOPES)}")
        if mode is not None and mode not in MODES:
            raise ConfigError(f"unknown guard mode '{mode}'; use one of {', '.join(MODES)}")
        self.lm, self.run = lm, run if isinstance(run, RunDir) else RunDir(run)
        stored = stored_plan(self.run, action) if use_stored_plan else None
        edit_source, stored_mu = "the control stages", None
        if (stored is not None and alpha is None and vector_layer is None and k is None and scope is None
                and mode is None):
            alpha, vector_layer, k, scope, mode = (stored.get("alpha"), stored.get("vector_layer"), stored.get("k"),
                                                   stored.get("scope"), stored.get("mode"))
            stored_mu = stored.get("clean_projection")
            edit_source = f"chosen on validation ({'/'.join(PLAN_FILE)})"
        scope, mode = scope or "prompt", mode or "subtract"
        if mode == "clamp" and action != "vector":
            raise ConfigError("mode='clamp' is an edit of the vector action; drop it or use action='vector'")
        arch = lm.arch
        self._delta: torch.Tensor | None = None
        self._unit: torch.Tensor | None = None  # clamp mode: u = v / |v|
        self._mu = 0.0
        self._cols: dict[int, torch.Tensor] = {}
        heads, kk, k_why, vlayer, a, vnorm = [], None, None, None, None, None
        if action == "vector":
            v, vlayer, a = vector_edit(self.run, arch.d_model, vector_layer, alpha)
            check_layers(arch, [vlayer])
            if control_seed is not None:
                v = random_like(v, control_seed)
            self._delta = (a * v).float()
            edit_layers, vnorm = [vlayer], float(v.norm())
            if mode == "clamp":
                self._unit = (v / v.norm().clamp_min(1e-12)).float()
                self._mu = (float(stored_mu) if stored_mu is not None and control_seed is None
                            else clean_projection(lm, self.run, vlayer, self._unit))
        else:
            heads, kk, k_why = heads_edit(self.run, arch, k, target_asr)
            if control_seed is not None:
                heads = random_heads(arch.n_layers, arch.n_heads, kk, control_seed)
            for lay, h in heads:  # per edited layer: the z columns of its removed heads, [n_heads * d_head] bool
                mask = self._cols.setdefault(lay, torch.zeros(arch.n_heads * arch.d_head, dtype=torch.bool))
                mask[h * arch.d_head:(h + 1) * arch.d_head] = True
            edit_layers = sorted(self._cols)
        path, probes = load_probes(self.run, probe, min(edit_layers))
        if layer is None:
            layer, why = probe_layer_at_most(probes, min(edit_layers))
        else:
            layer, why = int(layer), "given"
            if layer > min(edit_layers):
                raise ConfigError(f"probe layer {layer} comes after the edit layer {min(edit_layers)}; pick a probe "
                                  f"layer <= {min(edit_layers)} so one forward pass suffices")
        check_layers(arch, [layer])
        self.detector = Detector(lm, probes, layer, str(probes.meta.get("kind", "attn_input")), batch_size)
        self.plan = GuardPlan(action, layer, self.detector.kind, why, edit_layers, vector_layer=vlayer, alpha=a,
                              vector_norm=vnorm, heads=[list(h) for h in heads], k=kk, k_reason=k_why,
                              scope=scope, mode=mode, clean_projection=self._mu if mode == "clamp" else None,
                              edit_source=edit_source, control_seed=control_seed,
                              probe_file=str(path.relative_to(self.run.path)))
        #: what a stored threshold must have been calibrated with (:func:`bkdattr.disarm.plan.threshold_key`)
        self.threshold_key = threshold_key(path, layer, self.detector.kind)
        self._template = Template.of(lm.tokenizer)
        self._stack: contextlib.ExitStack | None = None
        self._explicit: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None  # p(x) per row of the current prefill, None outside one
        self._flags: torch.Tensor | None = None  # rows flagged in the current call
        self._last_flags: torch.Tensor | None = None  # rows flagged in the last prefill (for scope="all")
        self._all = False  # the current call edits every column of its flagged rows (scope="all")
        self.n_seen = self.n_flagged = self.n_unmapped_steps = 0
        if threshold is None:
            threshold, source = stored_threshold(self.run, self.threshold_key) or (
                self.calibrate()["threshold"], IN_MEMORY)
        else:
            source = "given"
        self.plan.threshold, self.plan.threshold_source = float(threshold), source

    @property
    def threshold(self) -> float:
        return self.plan.threshold

    # ---- scores and threshold ---------------------------------------------------------------------------
    def scores(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """``P(triggered)`` of user ``texts`` exactly as the guard computes it during a prefill: float64 ``[N]``.
        No edit is made."""
        return prompt_probabilities(self.lm, self.detector.probe, self.plan.probe_layer, self.detector.kind,
                                    texts, self.detector.batch_size, progress)

    def calibrate(self, max_fpr: float = MAX_FPR, progress: bool = False) -> dict[str, Any]:
        """The validation threshold of this guard's detector (:mod:`bkdattr.disarm.calibrate`) and its validation
        TPR / FPR; stores nothing."""
        return calibrate_threshold(lambda texts: self.scores(texts, progress), self.run, max_fpr)

    # ---- hooks ------------------------------------------------------------------------------------------
    def prompt_positions(self, input_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """``p(x)`` per row of a forward call's columns: ``[B]``
        (:meth:`~bkdattr.core.template.Template.prompt_positions`)."""
        return self._template.prompt_positions(input_ids, mask)

    def _on_call(self, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        self._flags = None
        if x is None:
            self._pos = None
            return
        t = x.shape[1]
        last_flags, self._all = self._last_flags, False
        if t == 1 and past_length(kwargs) > 0:  # a decode step: left alone unless scope="all"
            self._pos = None
            if self.plan.scope == "all" and last_flags is not None:
                if len(last_flags) == x.shape[0]:
                    self._pos, self._flags, self._all = torch.zeros(x.shape[0], dtype=torch.long), last_flags, True
                else:  # rows dropped or reordered since the prefill: the flags no longer map onto them
                    self.n_unmapped_steps += 1
            return
        self._last_flags = None
        mask = kwargs.get("attention_mask")
        mask = (torch.ones(x.shape[:2], dtype=torch.long, device=x.device) if not isinstance(mask, torch.Tensor)
                or mask.dim() != 2 else mask[:, -t:])
        if self._explicit is not None:
            self._pos = self._explicit.to(x.device)
        else:
            self._pos = self.prompt_positions(ids if ids is not None and ids.dim() == 2 else None, mask)

    def _on_features(self, x: torch.Tensor) -> None:
        if self._pos is None or self._flags is not None:
            return
        b = torch.arange(x.shape[0], device=x.device)
        p = probe_probability(self.detector.probe, x[b, self._pos.to(x.device)].float())
        flags = p > self.plan.threshold
        self.n_seen += len(p)
        self.n_flagged += int(flags.sum())
        self._flags = torch.from_numpy(flags).to(x.device)
        self._last_flags = self._flags
        self._all = self.plan.scope == "all"

    def _select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The flagged rows of the current call (``[R]``) and the columns to edit in each (``[R, T]`` bool;
        None: every column), per the scope; None when no row is flagged."""
        if self._pos is None or self._flags is None or not bool(self._flags.any()):
            return None
        device, width = x.device, x.shape[1]
        rows = self._flags.to(device).nonzero().squeeze(1)
        if self._all:
            return rows, None
        cols = torch.arange(width, device=device)[None, :]
        pos = self._pos.to(device)[rows][:, None]
        return rows, (cols <= pos) if self.plan.scope == "prefix" else (cols == pos)

    def _vector(self, sub: torch.Tensor) -> torch.Tensor:
        """The vector action on the flagged rows' attention output ``[R, T, d]`` (float32)."""
        if self._unit is None:
            d = self._delta.to(sub.device)
        else:  # clamp: alpha * the excess along u over the clean mean, per column
            u = self._unit.to(sub.device)
            d = self.plan.alpha * (sub @ u - self._mu).clamp_min(0)[..., None] * u
        return sub - d

    def _heads(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The heads action at ``layer``: the removed heads' slices of the flagged rows' ``z`` ``[R, T, H*d_h]``
        set to zero."""
        cols = self._cols[layer]
        return lambda sub: sub.masked_fill(cols.to(sub.device)[None, None, :], 0)

    def __enter__(self) -> Guard:
        if self._stack is not None:
            raise ConfigError("this guard is already active; one 'with guard:' block at a time")
        arch, lay = self.lm.arch, self.plan.probe_layer
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(watch_calls(backbone(self.lm.model), self._on_call))
            if self.plan.probe_kind == "attn_input":
                stack.enter_context(tap(arch.input_norm[lay], self._on_features))
            else:
                stack.enter_context(tap(arch.layers[lay], self._on_features, pre=True))
            if self.plan.action == "vector":
                stack.enter_context(masked_edit(arch, self.plan.vector_layer, self._select, self._vector))
            else:
                for layer in self._cols:
                    stack.enter_context(masked_edit(arch, layer, self._select, self._heads(layer), at="z"))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        self._pos = self._flags = self._last_flags = None
        self._all = False
        if stack is not None:
            stack.close()

    @contextlib.contextmanager
    def at(self, positions: torch.Tensor) -> Iterator[None]:
        """Inside this block, ``p(x)`` of every prefill is ``positions`` (``[B]`` indices into the call's
        columns) instead of being found from the batch."""
        old, self._explicit = self._explicit, torch.as_tensor(positions, dtype=torch.long)
        try:
            yield
        finally:
            self._explicit = old


def guard_generate(lm, run: RunDir | str, prompts: list[str], max_new_tokens: int = 64, action: str = "vector",
                   **kw: Any) -> list[str]:
    """Greedy replies of ``lm`` to ``prompts`` under the guard of ``run`` (the CLI's ``generate --guard``)."""
    with Guard(lm, run, action, **kw):
        return generate(lm, prompts, max_new_tokens=max_new_tokens, progress=False)
