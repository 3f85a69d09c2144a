"""Head-level hooks: every way bkdattr reads or edits a forward pass, in one module.

Every hook here is registered on a module object inside a context manager and removed on exit, even when
the block raises. Captured values are float32 whatever the model dtype.

Capture (read):

* :func:`capture_contributions` -- ``a_{l,h}(x)`` at ``p(x)``: the pre-hook on layer ``l``'s output
  projection reads ``z_l`` ``[B, T, H*d_h]`` and returns ``[B, H, d_model]`` via the effective ``W_O``
  (cached per model in :class:`~bkdattr.core.arch.Arch`).
* :func:`capture_attention_output` -- the attention output (bias included) at ``p(x)``: ``[B, d_model]``.
* :func:`capture_features` -- the normalised attention input (output of the layer's input norm) or the raw
  residual stream (the layer's input) at ``p(x)``: ``[B, d_model]`` per layer.
* :func:`capture_layer_calls` -- the first call of each decoder layer: hidden states and every other argument
  (what the exact attribution path replays).

Edit (write):

* :func:`add_to_attention_output` -- add a vector (one, or one per row) to layer ``l``'s attention output at
  ``positions``, or (``positions=None``) at the last position of every multi-token call: the prefill of a
  left-padded batch, whose last column is ``p(x)``; single-token decode steps stay unedited.
* :func:`edit_heads` -- zero (ablate) or replace chosen heads' slices of ``z_l`` at ``p(x)``, the same for
  every row; :func:`zero_heads_rowwise` -- zero a per-row head mask (many edits stacked in one batch).
* :func:`masked_edit` -- any edit of chosen rows and columns of a layer's attention output or of its ``z``,
  decided per forward call (the runtime guard's edit: only the rows its probe flags).

Watch (read only, per call): :func:`watch_calls` -- a module's call arguments; :func:`tap` -- a module's output
or hidden-states input.

Count:

* :func:`count_work` -- the forward work of every call through the model, counted at its first decoder layer
  as token positions (a position whose hidden states carry a gradient counts :data:`GRAD_WORK` times: forward
  and backward). A budget stated in this work (the scan's) gives the same search on a fast, slow or busy machine.

Layer and head indices and vector shapes are checked before anything is registered (:class:`ConfigError`), and
hooks are registered inside the cleanup context, so a failure part-way leaves none behind;
:func:`hook_count` counts what is left (0 when clean).

``positions`` is a ``[B]`` tensor of indices into the sequence of the *current* forward call. An edit applies
to every forward call made inside its context, so "prefill only" means: open the context around the prefill
call only (:func:`bkdattr.core.generation.greedy_decode` takes an ``edit`` for this).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .arch import Arch
from .errors import ConfigError


@contextlib.contextmanager
def registered(handles: list) -> Iterator[None]:
    """Remove every hook handle in ``handles`` when the block exits (normally or not)."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def check_layers(arch: Arch, layers: Iterable[int] | None) -> list[int]:
    """The requested layer indices (all by default), checked against the model."""
    out = list(range(arch.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x < arch.n_layers]
    if bad:
        raise ConfigError(f"layer {bad[0]} does not exist (the model has layers 0..{arch.n_layers - 1}); "
                          "pick layers in that range")
    return out


def _rows(x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.arange(x.shape[0], device=x.device)
    return b, positions.to(x.device)


HIDDEN_KEYS = ("hidden_states", "x", "input", "hidden_state")


class HiddenStatesNotFound(RuntimeError):
    """A hooked module was called without a recognisable hidden-states argument."""


def _hidden_key(args: tuple, kwargs: dict) -> str | None:
    """``None`` when the hidden states are the first positional argument, else their keyword."""
    if args:
        return None
    key = next((k for k in HIDDEN_KEYS if k in kwargs), None)
    if key is None:
        raise HiddenStatesNotFound(f"no hidden states among the module's arguments (looked for {HIDDEN_KEYS})")
    return key


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states among a forward pre-hook's ``(args, kwargs)``."""
    key = _hidden_key(args, kwargs)
    return args[0] if key is None else kwargs[key]


def with_hidden(args: tuple, kwargs: dict, z: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a forward pre-hook with the hidden states replaced by ``z``."""
    key = _hidden_key(args, kwargs)
    return ((z, *args[1:]), kwargs) if key is None else (args, {**kwargs, key: z})


def out_tensor(out) -> torch.Tensor:
    """The tensor of a module's output (the first item of a tuple output)."""
    return out[0] if isinstance(out, tuple) else out


def with_out(out, o: torch.Tensor):
    """A module's output with its tensor replaced by ``o`` (tuple outputs keep their other items)."""
    return (o, *out[1:]) if isinstance(out, tuple) else o


# ---- capture ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def capture_contributions(arch: Arch, positions: torch.Tensor, layers: Iterable[int] | None = None, with_z: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture per-head contributions at ``positions``.

    Yields a dict filled after the forward pass: ``store[l]`` is float32 ``[B, H, d_model]``; with
    ``with_z`` also ``store[("z", l)]`` is float32 ``[B, H, d_h]``. Only the first forward call is captured.
    """
    layers = check_layers(arch, layers)
    store: dict = {}
    handles: list = []
    with registered(handles):
        for layer in layers:
            def pre(_m, args, kwargs, layer=layer):
                if layer in store:
                    return None
                z = hidden_arg(args, kwargs)
                b, p = _rows(z, positions)
                zp = z[b, p].float().reshape(z.shape[0], arch.n_heads, arch.d_head)
                w = arch.w_o_heads(layer).to(zp.device)  # [H, d_h, d]
                store[layer] = torch.einsum("bhk,hkd->bhd", zp, w)
                if with_z:
                    store[("z", layer)] = zp
                return None

            handles.append(arch.out_proj[layer].register_forward_pre_hook(pre, with_kwargs=True))
        yield store


def _capture_at(modules: Mapping[int, nn.Module], positions: torch.Tensor, pre: bool
                ) -> contextlib.AbstractContextManager[dict[int, torch.Tensor]]:
    """``store[l]``: float32 ``[B, d]`` rows at ``positions`` of ``modules[l]``'s output (or, ``pre``, its
    hidden-state input), first forward call only."""

    @contextlib.contextmanager
    def ctx() -> Iterator[dict[int, torch.Tensor]]:
        store: dict[int, torch.Tensor] = {}
        handles: list = []
        with registered(handles):
            for layer, module in modules.items():
                def keep(x: torch.Tensor, layer=layer) -> None:
                    if layer not in store:
                        b, p = _rows(x, positions)
                        store[layer] = x[b, p].float()

                if pre:
                    handles.append(module.register_forward_pre_hook(
                        lambda _m, args, kwargs, keep=keep: keep(hidden_arg(args, kwargs)), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(lambda _m, _a, out, keep=keep: keep(out_tensor(out))))
            yield store

    return ctx()


def capture_attention_output(arch: Arch, positions: torch.Tensor, layers: Iterable[int] | None = None
) -> contextlib.AbstractContextManager[dict[int, torch.Tensor]]:
    """Capture the attention output (output projection's output, bias included) at ``positions``:
    ``store[l]`` float32 ``[B, d_model]`` (first forward call only)."""
    return _capture_at({x: arch.out_proj[x] for x in check_layers(arch, layers)}, positions, pre=False)


def capture_features(arch: Arch, positions: torch.Tensor, kind: str = "attn_input", layers: Iterable[int] | None = None
) -> contextlib.AbstractContextManager[dict[int, torch.Tensor]]:
    """Capture probe features at ``positions``: ``kind="attn_input"`` (output of the input norm) or
    ``"residual"`` (the layer's input). ``store[l]`` is float32 ``[B, d_model]`` (first call only)."""
    if kind not in ("attn_input", "residual"):
        raise ValueError(f"unknown feature kind '{kind}'; use attn_input or residual")
    layers = check_layers(arch, layers)
    if kind == "attn_input":
        return _capture_at({x: arch.input_norm[x] for x in layers}, positions, pre=False)
    return _capture_at({x: arch.layers[x] for x in layers}, positions, pre=True)


@dataclass
class LayerCall:
    """One recorded call of a decoder layer: its hidden-state input, the other positional arguments, the
    keyword arguments and the keyword the hidden states came under (``None``: first positional)."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    hidden_key: str | None

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, args: tuple | None = None,
                 kwargs: dict | None = None) -> torch.Tensor:
        """Call ``layer`` on ``hidden`` with the recorded arguments (or replacements ``args``/``kwargs``);
        return its hidden-state output. ``hidden`` goes to the device the model itself passed."""
        args = self.args if args is None else args
        kwargs = self.kwargs if kwargs is None else kwargs
        hidden = hidden.to(self.hidden.device)
        if self.hidden_key is None:
            return out_tensor(layer(hidden, *args, **kwargs))
        return out_tensor(layer(**{self.hidden_key: hidden}, **kwargs))


@contextlib.contextmanager
def capture_layer_calls(layers: Sequence[nn.Module]) -> Iterator[list[LayerCall | None]]:
    """Record the first call of each module in ``layers`` (:class:`LayerCall`). Yields a list filled during
    the forward pass (``None`` for a layer that was not called)."""
    store: list[LayerCall | None] = [None] * len(layers)
    handles: list = []
    with registered(handles):
        for j, layer in enumerate(layers):
            def pre(_m, args, kwargs, j=j):
                if store[j] is None:
                    key = _hidden_key(args, kwargs)
                    if key is None:
                        store[j] = LayerCall(args[0], tuple(args[1:]), dict(kwargs), None)
                    else:
                        store[j] = LayerCall(kwargs[key], (), {k: v for k, v in kwargs.items() if k != key}, key)

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        yield store


# ---- edit -------------------------------------------------------------------------------------------------
def _check_deltas(arch: Arch, deltas: Mapping[int, torch.Tensor]) -> None:
    """Each vector added to an attention output is ``[d_model]`` or ``[B, d_model]``."""
    check_layers(arch, deltas.keys())
    for layer, delta in deltas.items():
        if delta.shape[-1] != arch.d_model or delta.dim() not in (1, 2):
            raise ConfigError(f"the vector added at layer {layer} has shape {tuple(delta.shape)} but the model's "
                              f"d_model is {arch.d_model} ([d_model] or [batch, d_model]); build it for this model")


@contextlib.contextmanager
def add_to_attention_output(arch: Arch, deltas: Mapping[int, torch.Tensor], positions: torch.Tensor | None = None,
                            every_position: bool = False) -> Iterator[None]:
    """Add ``deltas[l]`` (``[d_model]`` or ``[B, d_model]``, float32 arithmetic) to layer ``l``'s attention
    output at ``positions`` (``[B]``) on every forward call inside the block. ``positions=None``: at the last
    position of every call over more than one token (the prefill of a left-padded batch, where it is ``p(x)``);
    single-token calls (decode steps) are left alone, so a whole generation can run inside the block.
    ``every_position``: at every position of every call (an output bias, without changing the weights)."""
    _check_deltas(arch, deltas)
    handles: list = []
    with registered(handles):
        for layer, delta in deltas.items():
            def hook(_m, _args, out, delta=delta):
                o = out_tensor(out)
                if every_position:
                    return with_out(out, (o.float() + delta.to(o.device, torch.float32)).to(o.dtype))
                if positions is None:
                    if o.shape[1] < 2:
                        return None
                    b, p = slice(None), -1
                else:
                    b, p = _rows(o, positions)
                o = o.clone()
                o[b, p] = (o[b, p].float() + delta.to(o.device, torch.float32)).to(o.dtype)
                return with_out(out, o)

            handles.append(arch.out_proj[int(layer)].register_forward_hook(hook))
        yield


@contextlib.contextmanager
def _edit_z(arch: Arch, plan: Mapping[int, object], positions: torch.Tensor, edit) -> Iterator[None]:
    """Pre-hooks on the output projections of ``plan``'s layers replacing the rows ``z[b, positions[b]]``
    ``[B, H*d_h]`` by ``edit(rows, plan[l])`` on every call inside the block."""
    handles: list = []
    with registered(handles):
        for layer, item in plan.items():
            def pre(_m, args, kwargs, item=item):
                z = hidden_arg(args, kwargs)
                b, p = _rows(z, positions)
                z = z.clone()
                z[b, p] = edit(z[b, p], item)
                return with_hidden(args, kwargs, z)

            handles.append(arch.out_proj[layer].register_forward_pre_hook(pre, with_kwargs=True))
        yield


@contextlib.contextmanager
def edit_heads(arch: Arch, heads: Mapping[int, Iterable[int]], positions: torch.Tensor,
               values: Mapping[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Zero (default) or replace chosen heads' slices of ``z_l`` at ``positions``.

    ``heads[l]`` lists head indices of layer ``l``; ``values[l]`` (optional) is ``[len(heads[l]), d_h]`` or
    ``[B, len(heads[l]), d_h]`` holding the replacement ``z`` slices. Applies on every call in the block."""
    plan = {}
    for layer, hs in heads.items():
        check_layers(arch, [layer])
        hs = [int(h) for h in hs]
        if not hs:
            continue
        if any(not 0 <= h < arch.n_heads for h in hs):
            raise ConfigError(f"layer {layer}: head indices {hs} out of range (the model has heads "
                              f"0..{arch.n_heads - 1}); pick heads in that range")
        val = None if values is None else values.get(layer)
        if val is not None and (val.dim() not in (2, 3) or tuple(val.shape[-2:]) != (len(hs), arch.d_head)):
            raise ConfigError(f"layer {layer}: replacement z has shape {tuple(val.shape)}; expected "
                              f"[{len(hs)}, {arch.d_head}] or [batch, {len(hs)}, {arch.d_head}]")
        cols = torch.cat([torch.arange(h * arch.d_head, (h + 1) * arch.d_head) for h in hs])
        plan[int(layer)] = (cols, val)

    def edit(rows: torch.Tensor, item) -> torch.Tensor:
        cols, val = item
        c = cols.to(rows.device)
        if val is None:
            rows[:, c] = 0
        else:
            rows[:, c] = val.to(rows.device, rows.dtype).reshape(-1, len(cols)).expand(rows.shape[0], -1)
        return rows

    with _edit_z(arch, plan, positions, edit):
        yield


@contextlib.contextmanager
def zero_heads_rowwise(arch: Arch, masks: Mapping[int, torch.Tensor], positions: torch.Tensor) -> Iterator[None]:
    """Zero head slices of ``z_l`` at ``positions`` row by row: ``masks[l]`` is bool ``[B, H]``, True where
    head ``h`` of row ``b`` is zeroed. Applies on every forward call inside the block."""
    check_layers(arch, masks.keys())
    for layer, m in masks.items():
        if m.dim() != 2 or m.shape[1] != arch.n_heads:
            raise ConfigError(f"head mask of layer {layer} has shape {tuple(m.shape)}; "
                              f"expected [batch, {arch.n_heads}]")

    def edit(rows: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        zp = rows.reshape(rows.shape[0], arch.n_heads, arch.d_head)
        zp = torch.where(m.to(rows.device)[:, :, None], torch.zeros((), dtype=rows.dtype, device=rows.device), zp)
        return zp.reshape(rows.shape[0], -1)

    with _edit_z(arch, {int(k): v for k, v in masks.items()}, positions, edit):
        yield


@contextlib.contextmanager
def watch_calls(module: nn.Module, fn: Callable[[tuple, dict], None]) -> Iterator[None]:
    """Call ``fn(args, kwargs)`` before every forward call of ``module`` inside the block (read only: the call's
    inputs are passed on unchanged)."""
    def pre(_m, args, kwargs):
        fn(args, kwargs)

    handles: list = []
    with registered(handles):
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        yield


@contextlib.contextmanager
def tap(module: nn.Module, fn: Callable[[torch.Tensor], None], pre: bool = False) -> Iterator[None]:
    """Call ``fn(x)`` on every forward call of ``module`` inside the block: ``x`` is the module's output tensor,
    or (``pre``) its hidden-states input, ``[B, T, d]``. Read only."""
    handles: list = []
    with registered(handles):
        if pre:
            handles.append(module.register_forward_pre_hook(lambda _m, a, kw: fn(hidden_arg(a, kw)),
                                                            with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out: fn(out_tensor(out))))
        yield


#: selected rows ``[R]`` of a call and, per row, the columns to edit (``[R, T]`` bool; None: every column)
Selection = tuple[torch.Tensor, torch.Tensor | None]


@contextlib.contextmanager
def masked_edit(arch: Arch, layer: int, select: Callable[[torch.Tensor], Selection | None],
                edit: Callable[[torch.Tensor], torch.Tensor], at: str = "out") -> Iterator[None]:
    """Edit chosen rows and columns of layer ``layer``'s attention on every forward call inside the block.

    ``at="out"``: the attention output (the output projection's output, ``[B, T, d_model]``); ``at="z"``: the
    output projection's input ``z`` (``[B, T, H*d_h]``, every head's slice). ``select(x)`` returns the rows to
    edit and their columns (:data:`Selection`), or None to leave the call alone; ``edit(sub)`` maps the selected
    rows ``[R, T, D]`` (float32) to their new values. Selected columns take the new values, every other entry is
    kept bit for bit, and the result is cast back to the model's dtype once."""
    if at not in ("out", "z"):
        raise ConfigError(f"unknown edit point '{at}'; use out or z")
    check_layers(arch, [layer])

    def apply(x: torch.Tensor) -> torch.Tensor | None:
        sel = select(x)
        if sel is None:
            return None
        rows, cols = sel
        x = x.clone()
        sub = x[rows].float()
        new = edit(sub)
        if cols is not None:
            new = torch.where(cols[..., None], new, sub)
        x[rows] = new.to(x.dtype)
        return x

    def hook(_m, _args, out):
        o = apply(out_tensor(out))
        return None if o is None else with_out(out, o)

    def pre(_m, args, kwargs):
        z = apply(hidden_arg(args, kwargs))
        return None if z is None else with_hidden(args, kwargs, z)

    handles: list = []
    with registered(handles):
        module = arch.out_proj[int(layer)]
        handles.append(module.register_forward_hook(hook) if at == "out"
                       else module.register_forward_pre_hook(pre, with_kwargs=True))
        yield


_FRAMEWORK_MODULES = ("transformers.", "accelerate.", "peft.", "torch.")


def _is_framework_hook(fn) -> bool:
    mod = getattr(fn, "__module__", None) or getattr(type(fn), "__module__", "") or ""
    return mod.startswith(_FRAMEWORK_MODULES)


def hook_count(model: nn.Module, include_framework: bool = False) -> int:
    """Number of forward hooks and pre-hooks registered anywhere in ``model`` (0 when clean).

    Hooks that transformers, accelerate, peft or torch install for themselves (transformers 5 keeps
    output-capturing hooks on the decoder layers once ``output_hidden_states`` has been used) are not counted
    unless ``include_framework``."""
    n = 0
    for m in model.modules():
        for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
            n += include_framework or not _is_framework_hook(fn)
    return n


#: work of one token position through a pass that also runs backward (forward + about twice its cost)
GRAD_WORK = 3


@dataclass
class WorkMeter:
    """Token positions through the model so far (see :func:`count_work`); :meth:`units` in millions."""

    tokens: int = 0

    def units(self) -> float:
        return self.tokens / 1e6


@contextlib.contextmanager
def count_work(arch: Arch) -> Iterator[WorkMeter]:
    """Count the forward work of every call inside the block: ``B * T`` token positions per call of the first
    decoder layer (prefill, cached decode step or teacher-forced pass alike), times :data:`GRAD_WORK` when its
    hidden states carry a gradient."""
    meter = WorkMeter()

    def pre(_mod, args, kwargs):
        h = hidden_arg(args, kwargs)
        meter.tokens += int(h.shape[0] * h.shape[1]) * (GRAD_WORK if h.requires_grad else 1)

    handles: list = []
    with registered(handles):
        handles.append(arch.layers[0].register_forward_pre_hook(pre, with_kwargs=True))
        yield meter
