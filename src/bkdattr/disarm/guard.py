"""A probe-gated runtime guard: switch the backdoor off for the prompts the Backdoor Probe flags, and only those.

No weight changes. Inside ``with Guard(lm, run):`` every forward pass of the model is watched, and on the
**prefill** pass only (a call over more than one position, or over one position with an empty KV cache; decode
steps are left alone and see the edit through the KV cache, exactly as the control stage's edits):

1. **Where.** ``p(x)``, the prompt's last position, per row: the last column under left padding (generation);
   in a teacher-forced row (prompt + reply, right padded) the end of the *last* assistant header, found by its
   token ids (the common suffix of every rendered prompt); :meth:`Guard.at` states the positions outright.
2. **Read.** The probe's features at ``p(x)`` at layer ``L_p`` (``attn_input``: the output of the layer's input
   norm; ``residual``: the layer's input -- :mod:`bkdattr.probe.features`), float32. The probe is the guard's
   own (:mod:`bkdattr.disarm.guard_probe`: trained on the run's training prompts only, so the validation and
   test prompts stay unseen) when ``disarm --strategy guard`` has made it, else the probe stage's.
3. **Decide.** The saved probe of that layer gives ``P(triggered)`` per row; rows with ``P > threshold`` are
   flagged.
4. **Edit** the flagged rows, later in the same pass: ``action="vector"`` subtracts ``alpha * v`` (the
   Backdoor Vector of the vector stage, at its layer ``l*``) from that layer's attention output
   (``mode="subtract"``), or, with ``mode="clamp"``, removes only the excess of the attention output ``o``
   along ``u = v / |v|`` over its clean mean ``mu`` (the mean of ``o . u`` at ``p(x)`` over the run's clean
   training prompts): ``o - alpha * max(0, o . u - mu) * u``, so a column where the backdoor direction is not
   raised is left as it is;
   ``action="heads"`` zeroes the top-k BAHA heads' slices of ``z_l`` (``k``: the smallest k of the ablation
   stage's sweep with ASR <= 0.05). ``scope="prompt"`` edits ``p(x)`` of the prefill only (the control
   stage's edit; later tokens see it through the KV cache); ``scope="prefix"`` edits every prompt column of
   a flagged row up to ``p(x)`` (the reply, decoded or teacher-forced, is not edited); ``scope="all"`` edits
   every column of a flagged row, on the prefill and on every decode step of the same batch (what a baked-in
   output bias does, but for the flagged prompts only). Unflagged rows are not touched at all, so a clean
   prompt's reply is bit for bit the unguarded one.

One pass suffices because the probe layer is at or before the first edited layer: when the probe's best
layer comes later, the best probe (validation accuracy, then validation loss, then the earliest) among the
layers ``<= l*`` is used, and :attr:`Guard.plan` records which and why.

**Threshold** (docs/METHOD.md section 8): chosen on the run's validation split so the false-positive rate on
clean prompts is at most ``max_fpr = 0.01``. With clean scores ``c_(1) >= c_(2) >= ...`` (``n`` prompts) and
``m = floor(max_fpr * n)``, any threshold ``>= c_(m+1)`` flags at most ``m`` clean prompts; the guard takes the
middle of the gap between ``c_(m+1)`` and the lowest triggered validation score above it (the same
validation TPR as the smallest admissible threshold, with a margin for unseen clean prompts), or ``c_(m+1)``
itself when no triggered score lies above. It is stored in ``RUN/disarm/guard_threshold.json``, keyed by the
probe file and layer.

The hooks live on module objects (a pre-hook on the decoder backbone that finds the prefill and ``p(x)``, a
hook at the probe layer, hooks on the edited output projections) and are removed on exit, even when the block
raises. They work the same around :func:`bkdattr.core.generation.generate` / ``greedy_decode``, transformers'
``model.generate`` (batched, left padded, KV cache) and teacher-forced passes. With ``scope="all"`` a decode
step is edited only when its batch has the rows of the prefill it follows (a decoder that drops finished rows
gets the prefill edit only; :attr:`Guard.n_unmapped_steps` counts such steps).

**Defaults.** ``bkdattr disarm --strategy guard`` chooses the edit (scope and scale) on the validation split
and stores it in ``RUN/disarm/guard_plan.json`` (docs/METHOD.md section 8); a guard built without explicit
``alpha`` / ``vector_layer`` / ``k`` / ``scope`` takes the stored choice for its action, else the control
stages' values and ``scope="prompt"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..control.ablation import share_k
from ..control.stage import load_ranking
from ..control.vector import load_vector, random_heads, random_like
from ..core.errors import ArtifactError, ConfigError, InputFileError
from ..core.forward import backbone, captured_pass
from ..core.generation import generate
from ..core.hooks import (
    capture_attention_output,
    capture_features,
    check_layers,
    hidden_arg,
    out_tensor,
    registered,
    with_hidden,
    with_out,
)
from ..core.io import read_json, write_json
from ..core.models import input_device
from ..core.prompts import encode_prompts, has_chat_template, render_prompt
from ..core.rundir import RunDir, get_nested
from ..inject.data import load_splits
from ..probe.detector import Detector
from ..probe.probes import MLPProbes, SVMProbes
from .plan import GUARD_PROBE, probe_layer_at_most

ACTIONS = ("vector", "heads")
SCOPES = ("prompt", "prefix", "all")
MODES = ("subtract", "clamp")
#: clean training prompts whose mean projection ``mu`` the clamp mode keeps
N_CLEAN_PROJECTION = 32
MAX_FPR = 0.01
#: ablation ASR at or below which a k counts as disarming (issue 14)
DISARM_ASR = 0.05
THRESHOLD_FILE = ("disarm", "guard_threshold.json")
PLAN_FILE = ("disarm", "guard_plan.json")


@dataclass
class GuardPlan:
    """What a guard does, JSON-serialisable: the probe (layer, kind, why that layer), the threshold and where
    it came from, the action and its edit (vector layer and scale, or the heads)."""

    action: str
    probe_layer: int
    probe_kind: str
    probe_layer_reason: str
    edit_layers: list[int]
    threshold: float = float("nan")
    threshold_source: str = ""
    vector_layer: int | None = None
    alpha: float | None = None
    vector_norm: float | None = None
    heads: list[list[int]] = field(default_factory=list)
    k: int | None = None
    k_reason: str | None = None
    scope: str = "prompt"
    mode: str = "subtract"  # vector action: subtract alpha * v, or clamp the component along v to its clean mean
    clean_projection: float | None = None  # clamp mode: mu
    edit_source: str = "the control stages"
    control_seed: int | None = None  # set: the same-size random control (random vector / random heads)
    probe_file: str = ""  # relative to the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the run's artifacts -----------------------------------------------------------------------------------
PROBES = ("auto", "guard", "mlp", "svm")


def _probe_path(run: RunDir, probe: str):
    """The probe file of ``probe``: ``guard`` (the guard's own, trained on the training split by ``bkdattr
    disarm --strategy guard``), ``mlp`` / ``svm`` (the probe stage's backdoored-model probes)."""
    if probe not in PROBES:
        raise ConfigError(f"unknown probe '{probe}'; use one of {', '.join(PROBES)}")
    if probe == "guard":
        path = run.path.joinpath(*GUARD_PROBE)
        if not path.is_file():
            raise InputFileError(f"{path} missing: the guard's own probe is trained by 'bkdattr disarm -r {run.path} "
                                 "--strategy guard'; run that first or use probe='mlp'")
        return path
    path = run.path / "probe" / ("backdoored_mlp.safetensors" if probe == "mlp" else "backdoored_svm.npz")
    if not path.is_file():
        raise InputFileError(f"{path} missing: the guard needs the probe stage's results; run 'bkdattr probe "
                             f"--run {run.path}' first")
    return path


def _load_probes(run: RunDir, probe: str, max_layer: int):
    """``(path, probes)`` for ``probe``; ``auto``: the guard's own probe when it exists and reads a layer
    ``<= max_layer``, else the probe stage's MLP probes."""
    if probe == "auto":
        own = run.path.joinpath(*GUARD_PROBE)
        if own.is_file():
            probes = MLPProbes.load(own)
            if min(probes.layers) <= max_layer:
                return own, probes
        probe = "mlp"
    path = _probe_path(run, probe)
    return path, MLPProbes.load(path) if probe != "svm" else SVMProbes.load(path)


def _vector_edit(run: RunDir, d_model: int, layer: int | None, alpha: float | None) -> tuple[torch.Tensor, int, float]:
    path = run.path / "control" / "backdoor_vector.safetensors"
    m = run.metrics()
    if not path.is_file() or get_nested(m, "vector.best_layer") is None:
        raise InputFileError(f"{path} or metrics.vector missing: the guard's vector action needs the vector stage's "
                             f"results; run 'bkdattr vector --run {run.path}' first")
    v = load_vector(path, d_model).vector.float()
    return v, int(layer if layer is not None else get_nested(m, "vector.best_layer")), float(
        alpha if alpha is not None else get_nested(m, "vector.alpha", 1.0))


def disarming_k(run: RunDir, n_total: int) -> tuple[int, str]:
    """``k`` of the heads action: the smallest k > 0 whose ablation ASR (metrics.ablation.topk) is
    <= 0.05, else the largest k tried; without an ablation section the k nearest 3% of all heads."""
    topk = get_nested(run.metrics(), "ablation.topk")
    if not topk:
        k = share_k(n_total)
        return k, f"no ablation results: the k nearest 3% of all heads ({k})"
    tried = sorted((int(k), float(a)) for k, a in topk.items() if int(k) > 0)
    if not tried:
        raise ArtifactError("metrics.ablation.topk lists no k > 0; rerun 'bkdattr ablate' with ks above 0")
    ok = [k for k, a in tried if a <= DISARM_ASR]
    if ok:
        return ok[0], f"the smallest k whose ablation ASR is <= {DISARM_ASR}"
    return tried[-1][0], f"no k tried brings the ablation ASR to <= {DISARM_ASR}: the largest k tried"


def _heads_edit(run: RunDir, arch, k: int | None) -> tuple[list[tuple[int, int]], int, str]:
    k, why = (int(k), "given") if k is not None else disarming_k(run, arch.n_total_heads)
    ranking, _info = load_ranking(run, 0, arch.n_layers, arch.n_heads)  # the listed heads, checked against this model
    if not 1 <= k <= len(ranking):
        raise ConfigError(f"k={k} heads asked for but the ranking lists {len(ranking)} (the model has "
                          f"{arch.n_total_heads}); pick k in 1..{len(ranking)}")
    return ranking[:k], k, why


# ---- p(x) from a batch ---------------------------------------------------------------------------------------
def header_ids(tokenizer) -> list[int]:
    """Token ids every rendered prompt ends with (the assistant header of the chat template, or the plain
    format's ``Assistant:``): the common suffix of a few rendered prompts with different endings."""
    seqs = [tokenizer(render_prompt(tokenizer, t), add_special_tokens=not has_chat_template(tokenizer)).input_ids
            for t in ("a", "Why?", "x y z 1", "Done.\n")]
    n = 0
    while n < min(len(s) for s in seqs) - 1 and len({s[-1 - n] for s in seqs}) == 1:
        n += 1
    return list(seqs[0][len(seqs[0]) - n:])


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended column per row: ``[B]``."""
    t = mask.shape[1]
    return t - 1 - mask.flip(1).long().argmax(1)


def prompt_positions(header: Sequence[int], input_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """``p(x)`` per row of a forward call (``input_ids``/``mask`` ``[B, T]``): the last column when every row
    ends with the assistant ``header`` (left-padded prompts), else the end of the last occurrence of ``header``
    in the row (prompt + reply, any padding), else the row's last attended column. ``[B]`` long."""
    last = _last_real(mask)
    n = len(header)
    if input_ids is None or n == 0 or input_ids.shape[1] < n:
        return last
    head = torch.tensor(list(header), device=input_ids.device)
    if bool(mask[:, -1].all()) and bool((input_ids[:, -n:] == head).all()):
        return torch.full_like(last, input_ids.shape[1] - 1)
    win = input_ids.unfold(1, n, 1)  # [B, T-n+1, n]
    hit = (win == head).all(-1) & mask[:, n - 1:].bool()  # hit[b, j]: the header ends at column j + n - 1
    ends = torch.arange(hit.shape[1], device=hit.device) + n - 1
    found = torch.where(hit, ends, torch.full_like(ends, -1)).max(1).values
    return torch.where(found >= 0, found, last)


def _past_length(kwargs: dict) -> int:
    """Columns already in the KV cache of a forward call (the keyword is ``cache`` in newer transformers)."""
    pkv = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None), None)
    if pkv is not None:
        if hasattr(pkv, "get_seq_length"):
            return int(pkv.get_seq_length())
        with contextlib.suppress(Exception):
            return int(pkv[0][0].shape[-2])
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    return 0


# ---- the guard -----------------------------------------------------------------------------------------------
class Guard:
    """The probe-gated guard of ``run`` on ``lm`` (the run's model); use as ``with guard: ...`` (see the module
    docstring). ``probe``: ``auto`` (the guard's own probe, trained on the training split by ``bkdattr disarm
    --strategy guard``, when it exists; else the probe stage's MLP probes), ``guard``, ``mlp`` or ``svm``;
    ``layer``: the probe layer (default: the best at or before the first edited layer);
    ``threshold``: ``P(triggered)`` above which a prompt is flagged (default: the stored validation threshold,
    calibrated and stored when absent); ``alpha``/``vector_layer``: the vector's scale and layer (default: the
    vector stage's); ``k``: the number of top heads (default: :func:`disarming_k`); ``scope``: ``"prompt"``
    or ``"all"`` (module docstring); ``control_seed``: build the same-size random control instead (a random
    vector of the same norm, or k random heads, with this seed) behind the same detector; ``mode``: ``"subtract"``
    or ``"clamp"`` (vector action; module docstring)."""

    def __init__(self, lm, run: RunDir | str, action: str = "vector", threshold: float | None = None,
                 layer: int | None = None, *, probe: str = "auto", alpha: float | None = None,
                 vector_layer: int | None = None, k: int | None = None, scope: str | None = None,
                 mode: str | None = None, batch_size: int = 16, use_stored_plan: bool = True,
                 control_seed: int | None = None):
        if action not in ACTIONS:
            raise ConfigError(f"unknown guard action '{action}'; use one of {', '.join(ACTIONS)}")
        if scope is not None and scope not in SCOPES:
            raise ConfigError(f"unknown guard scope '{scope}'; use one of {', '.join(SCOPES)}")
        if mode is not None and mode not in MODES:
            raise ConfigError(f"unknown guard mode '{mode}'; use one of {', '.join(MODES)}")
        self.lm, self.run = lm, run if isinstance(run, RunDir) else RunDir(run)
        stored = stored_plan(self.run, action) if use_stored_plan else None
        edit_source = "the control stages"
        if (stored is not None and alpha is None and vector_layer is None and k is None and scope is None
                and mode is None):
            alpha, vector_layer, k, scope, mode = (stored.get("alpha"), stored.get("vector_layer"), stored.get("k"),
                                                   stored.get("scope"), stored.get("mode"))
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
            v, vlayer, a = _vector_edit(self.run, arch.d_model, vector_layer, alpha)
            check_layers(arch, [vlayer])
            if control_seed is not None:
                v = random_like(v, control_seed)
            self._delta = (a * v).float()
            edit_layers, vnorm = [vlayer], float(v.norm())
            if mode == "clamp":
                self._unit = (v / v.norm().clamp_min(1e-12)).float()
                self._mu = clean_projection(lm, self.run, vlayer, self._unit)
        else:
            heads, kk, k_why = _heads_edit(self.run, arch, k)
            if control_seed is not None:
                heads = random_heads(arch.n_layers, arch.n_heads, kk, control_seed)
            for lay, h in heads:  # per edited layer: the z columns of its removed heads, [n_heads * d_head] bool
                mask = self._cols.setdefault(lay, torch.zeros(arch.n_heads * arch.d_head, dtype=torch.bool))
                mask[h * arch.d_head:(h + 1) * arch.d_head] = True
            edit_layers = sorted(self._cols)
        path, probes = _load_probes(self.run, probe, min(edit_layers))
        self._probe_digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
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
        self._header = header_ids(lm.tokenizer)
        self._handles: list = []
        self._stack: contextlib.ExitStack | None = None
        self._explicit: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None  # p(x) per row of the current prefill, None outside one
        self._flags: torch.Tensor | None = None  # rows flagged in the current call
        self._last_flags: torch.Tensor | None = None  # rows flagged in the last prefill (for scope="all")
        self._all = False  # the current call edits every column of its flagged rows (scope="all")
        self.n_seen = self.n_flagged = self.n_unmapped_steps = 0
        if threshold is None:
            threshold, source = self._stored_or_calibrated()
        else:
            source = "given"
        self.plan.threshold, self.plan.threshold_source = float(threshold), source

    @property
    def threshold(self) -> float:
        return self.plan.threshold

    # ---- scores and threshold ---------------------------------------------------------------------------
    def _probability(self, feats: torch.Tensor) -> np.ndarray:
        """``P(triggered)`` (float64 ``[B]``) of features ``[B, d]`` at the probe layer."""
        s = np.asarray(self.detector.probe.scores(feats.detach().to("cpu", torch.float32)[:, None, :]),
                       dtype=np.float64)[:, 0]
        return 1.0 / (1.0 + np.exp(-s))

    @torch.no_grad()
    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """``P(triggered)`` of user ``texts`` exactly as the guard computes it during a prefill: float64 ``[N]``.
        No edit is made."""
        out = np.zeros(len(texts))
        net, dev, bs = backbone(self.lm.model), input_device(self.lm.model), self.detector.batch_size
        for s in range(0, len(texts), bs):
            b = encode_prompts(self.lm.tokenizer, list(texts[s: s + bs]), "left").to(dev)
            with capture_features(self.lm.arch, b.last_pos, self.detector.kind, [self.plan.probe_layer]) as st:
                net(**b.model_inputs(), use_cache=False)  # features only: no KV cache kept
            out[s: s + bs] = self._probability(st[self.plan.probe_layer])
        return out

    def _stored_or_calibrated(self) -> tuple[float, str]:
        path = self.run.sub(*THRESHOLD_FILE)
        key = {"probe_digest": self._probe_digest, "probe_layer": self.plan.probe_layer, "kind": self.plan.probe_kind}
        if path.is_file():
            saved = read_json(path)
            if all(saved.get(k) == v for k, v in key.items()) and isinstance(saved.get("threshold"), float):
                return float(saved["threshold"]), f"stored ({path.relative_to(self.run.path)})"
        rec = self.calibrate()
        write_json(path, {**key, **rec})
        where = path.relative_to(self.run.path)
        return float(rec["threshold"]), f"calibrated on the validation split (stored in {where})"

    def calibrate(self, max_fpr: float = MAX_FPR) -> dict[str, Any]:
        """The validation threshold (module docstring) and its validation TPR / FPR; does not store it."""
        val = load_splits(self.run).val
        if not val:
            raise ArtifactError(f"{self.run.path} has no validation prompts to choose the guard's threshold on; "
                                "pass threshold=... or rerun inject with a validation split")
        clean, trig = self.scores([e.prompt for e in val]), self.scores([e.triggered for e in val])
        return {**choose_threshold(clean, trig, max_fpr), "split": "val"}

    # ---- hooks ------------------------------------------------------------------------------------------
    def prompt_positions(self, input_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """``p(x)`` per row of a forward call's columns: ``[B]`` (:func:`prompt_positions`)."""
        return prompt_positions(self._header, input_ids, mask)

    def _on_call(self, _m, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        self._flags = None
        if x is None:
            self._pos = None
            return
        t = x.shape[1]
        last_flags, self._all = self._last_flags, False
        if t == 1 and _past_length(kwargs) > 0:  # a decode step: left alone unless scope="all"
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
        p = self._probability(x[b, self._pos.to(x.device)].float())
        flags = p > self.plan.threshold
        self.n_seen += len(p)
        self.n_flagged += int(flags.sum())
        self._flags = torch.from_numpy(flags).to(x.device)
        self._last_flags = self._flags
        self._all = self.plan.scope == "all"

    def _rows(self, device, width: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The flagged rows of the current call (``[R]``) and the columns to edit in each (``[R, width]`` bool;
        None: every column), per the scope."""
        if self._pos is None or self._flags is None or not bool(self._flags.any()):
            return None
        rows = self._flags.to(device).nonzero().squeeze(1)
        if self._all:
            return rows, None
        cols = torch.arange(width, device=device)[None, :]
        pos = self._pos.to(device)[rows][:, None]
        return rows, (cols <= pos) if self.plan.scope == "prefix" else (cols == pos)

    def _vector_hook(self, _m, _args, out):
        o = out_tensor(out)
        sel = self._rows(o.device, o.shape[1])
        if sel is None:
            return None
        rows, cols = sel
        o = o.clone()
        sub = o[rows].float()
        if self._unit is None:
            d = self._delta.to(o.device)
        else:  # clamp: alpha * the excess along u over the clean mean, per column
            u = self._unit.to(o.device)
            d = self.plan.alpha * (sub @ u - self._mu).clamp_min(0)[..., None] * u
        edited = sub - d if cols is None else torch.where(cols[..., None], sub - d, sub)
        o[rows] = edited.to(o.dtype)
        return with_out(out, o)

    def _heads_hook(self, layer: int):
        def pre(_m, args, kwargs):
            z = hidden_arg(args, kwargs)
            sel = self._rows(z.device, z.shape[1])
            if sel is None:
                return None
            rows, cols = sel
            heads = self._cols[layer].to(z.device)
            where = heads[None, None, :] if cols is None else cols[..., None] & heads[None, None, :]
            z = z.clone()
            z[rows] = z[rows].masked_fill(where, 0)
            return with_hidden(args, kwargs, z)

        return pre

    def __enter__(self) -> Guard:
        if self._stack is not None:
            raise ConfigError("this guard is already active; one 'with guard:' block at a time")
        arch, lay = self.lm.arch, self.plan.probe_layer
        stack = contextlib.ExitStack()
        stack.enter_context(registered(self._handles))
        try:
            h = self._handles
            h.append(backbone(self.lm.model).register_forward_pre_hook(self._on_call, with_kwargs=True))
            if self.plan.probe_kind == "attn_input":
                h.append(arch.input_norm[lay].register_forward_hook(
                    lambda _m, _a, o: self._on_features(out_tensor(o))))
            else:
                h.append(arch.layers[lay].register_forward_pre_hook(
                    lambda _m, a, kw: self._on_features(hidden_arg(a, kw)), with_kwargs=True))
            if self.plan.action == "vector":
                h.append(arch.out_proj[self.plan.vector_layer].register_forward_hook(self._vector_hook))
            else:
                for layer in self._cols:
                    h.append(arch.out_proj[layer].register_forward_pre_hook(self._heads_hook(layer), with_kwargs=True))
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


@torch.no_grad()
def clean_projection(lm, run: RunDir, layer: int, unit: torch.Tensor, n: int = N_CLEAN_PROJECTION,
                     batch_size: int = 16) -> float:
    """``mu``: the mean over the run's first ``n`` clean training prompts of the attention output of ``layer`` at
    ``p(x)`` projected on ``unit`` (``[d_model]``), accumulated in float32."""
    texts = list(dict.fromkeys(e.prompt for e in load_splits(run).train))[:n]
    if not texts:
        raise ArtifactError(f"{run.path} has no training prompts to measure the clean projection on; rerun inject")

    total, u = 0.0, unit.float().cpu()
    for s in range(0, len(texts), batch_size):
        _, st = captured_pass(lm, texts[s: s + batch_size],
                              lambda b: capture_attention_output(lm.arch, b.last_pos, [layer]))
        total += float((st[layer].float().cpu() @ u).sum())
    return total / len(texts)


def stored_plan(run: RunDir, action: str) -> dict[str, Any] | None:
    """The edit ``bkdattr disarm --strategy guard`` chose on validation for ``action`` (``RUN/disarm/
    guard_plan.json``: ``alpha``, ``vector_layer``, ``k``, ``scope``, ``mode``), or None."""
    path = run.sub(*PLAN_FILE)
    if not path.is_file():
        return None
    saved = read_json(path)
    return saved if isinstance(saved, dict) and saved.get("action") == action else None


def choose_threshold(clean: np.ndarray, triggered: np.ndarray, max_fpr: float = MAX_FPR) -> dict[str, Any]:
    """The guard's threshold from validation scores (module docstring): ``threshold``, ``bound`` (the smallest
    admissible threshold), ``fpr``/``tpr`` on these scores, ``n_clean``, ``n_triggered``, ``max_fpr``."""
    clean, triggered = np.asarray(clean, np.float64), np.asarray(triggered, np.float64)
    if not len(clean):
        raise ArtifactError("no clean validation prompts to choose the guard's threshold on")
    m = math.floor(max_fpr * len(clean) + 1e-9)
    bound = float(np.sort(clean)[::-1][min(m, len(clean) - 1)])
    above = triggered[triggered > bound]
    thr = (bound + float(above.min())) / 2 if len(above) else bound
    return {"threshold": thr, "bound": bound, "max_fpr": max_fpr,
            "fpr": float((clean > thr).mean()), "tpr": float((triggered > thr).mean()) if len(triggered) else None,
            "n_clean": len(clean), "n_triggered": len(triggered),
            "rule": "midpoint between the (floor(max_fpr*n)+1)-th highest clean score and the lowest triggered "
                    "score above it"}


def guard_generate(lm, run: RunDir | str, prompts: list[str], max_new_tokens: int = 64, action: str = "vector",
                   **kw: Any) -> list[str]:
    """Greedy replies of ``lm`` to ``prompts`` under the guard of ``run`` (the CLI's ``generate --guard``)."""
    with Guard(lm, run, action, **kw):
        return generate(lm, prompts, max_new_tokens=max_new_tokens, progress=False)


__all__ = ["ACTIONS", "MODES", "PLAN_FILE", "PROBES", "SCOPES", "Guard", "GuardPlan", "choose_threshold", "disarming_k",
           "clean_projection", "guard_generate", "header_ids", "probe_layer_at_most", "prompt_positions",
           "stored_plan"]
