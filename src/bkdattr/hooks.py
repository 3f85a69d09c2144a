"""Head-level hooks: capture and edit what each attention head writes at the last prompt position.

Every hook here is registered on a module object inside a context manager and removed on exit, even when
the block raises. Captured values are float32 whatever the model dtype.

* :func:`capture_contributions` -- ``a_{l,h}(x)`` at ``p(x)``: the pre-hook on layer ``l``'s output
  projection reads ``z_l`` ``[B, T, H*d_h]`` and returns ``[B, H, d_model]`` via the effective ``W_O``.
* :func:`capture_features` -- the normalised attention input (output of the layer's input norm) or the raw
  residual stream (the layer's input) at ``p(x)``: ``[B, d_model]`` per layer.
* :func:`add_to_attention_output` -- add a vector to layer ``l``'s attention output at ``p(x)``.
* :func:`edit_heads` -- zero (ablate) or replace chosen heads' slices of ``z_l`` at ``p(x)``.

Layer and head indices and vector shapes are checked before anything is registered (:class:`ConfigError`), and
hooks are registered inside the cleanup context, so a failure part-way leaves none behind;
:func:`hook_count` counts what is left (0 when clean).

``positions`` is a ``[B]`` tensor of indices into the sequence of the *current* forward call. An edit applies
to every forward call made inside its context, so "prefill only" means: open the context around the prefill
call only (:func:`bkdattr.generation.greedy_generate` takes a ``prefill_context`` for this).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

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


def _layers(arch: Arch, layers: Iterable[int] | None) -> list[int]:
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


_HIDDEN_KEYS = ("hidden_states", "x", "input", "hidden_state")


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for k in _HIDDEN_KEYS:
        if k in kwargs:
            return kwargs[k]
    raise RuntimeError("could not find the hidden states passed to the module")


def _with_hidden(args: tuple, kwargs: dict, z: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a forward pre-hook with the hidden states replaced by ``z``."""
    if args:
        return (z, *args[1:]), kwargs
    key = next(k for k in _HIDDEN_KEYS if k in kwargs)
    return args, {**kwargs, key: z}


def _check_deltas(arch: Arch, deltas: Mapping[int, torch.Tensor]) -> None:
    """Each vector added to an attention output is ``[d_model]`` or ``[B, d_model]``."""
    for layer, delta in deltas.items():
        if delta.shape[-1] != arch.d_model or delta.dim() not in (1, 2):
            raise ConfigError(f"the vector added at layer {layer} has shape {tuple(delta.shape)}; "
                              f"expected [{arch.d_model}] or [batch, {arch.d_model}]")


@contextlib.contextmanager
def capture_contributions(
    arch: Arch, positions: torch.Tensor, layers: Iterable[int] | None = None, with_z: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture per-head contributions at ``positions``.

    Yields a dict filled after the forward pass: ``store[l]`` is float32 ``[B, H, d_model]``; with
    ``with_z`` also ``store[("z", l)]`` is float32 ``[B, H, d_h]``. Only the first forward call is captured.
    """
    layers = _layers(arch, layers)
    store: dict = {}
    handles: list = []
    with registered(handles):
        for layer in layers:
            def pre(_m, args, kwargs, layer=layer):
                if layer in store:
                    return None
                z = _hidden_arg(args, kwargs)
                b, p = _rows(z, positions)
                zp = z[b, p].float().reshape(z.shape[0], arch.n_heads, arch.d_head)
                w = arch.w_o_heads(layer).to(zp.device)  # [H, d_h, d]
                store[layer] = torch.einsum("bhk,hkd->bhd", zp, w)
                if with_z:
                    store[("z", layer)] = zp
                return None

            handles.append(arch.out_proj[layer].register_forward_pre_hook(pre, with_kwargs=True))
        yield store


@contextlib.contextmanager
def capture_attention_output(
    arch: Arch, positions: torch.Tensor, layers: Iterable[int] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the attention output (output projection's output, bias included) at ``positions``:
    ``store[l]`` float32 ``[B, d_model]`` (first forward call only)."""
    layers = _layers(arch, layers)
    store: dict[int, torch.Tensor] = {}
    handles: list = []
    with registered(handles):
        for layer in layers:
            def hook(_m, _args, out, layer=layer):
                if layer in store:
                    return None
                o = out[0] if isinstance(out, tuple) else out
                b, p = _rows(o, positions)
                store[layer] = o[b, p].float()
                return None

            handles.append(arch.out_proj[layer].register_forward_hook(hook))
        yield store


@contextlib.contextmanager
def capture_features(
    arch: Arch, positions: torch.Tensor, kind: str = "attn_input", layers: Iterable[int] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture probe features at ``positions``: ``kind="attn_input"`` (output of the input norm) or
    ``"residual"`` (the layer's input). ``store[l]`` is float32 ``[B, d_model]`` (first call only)."""
    if kind not in ("attn_input", "residual"):
        raise ValueError(f"unknown feature kind '{kind}'; use attn_input or residual")
    layers = _layers(arch, layers)
    store: dict[int, torch.Tensor] = {}
    handles: list = []
    with registered(handles):
        for layer in layers:
            if kind == "attn_input":
                def hook(_m, _args, out, layer=layer):
                    if layer not in store:
                        o = out[0] if isinstance(out, tuple) else out
                        b, p = _rows(o, positions)
                        store[layer] = o[b, p].float()

                handles.append(arch.input_norm[layer].register_forward_hook(hook))
            else:
                def pre(_m, args, kwargs, layer=layer):
                    if layer not in store:
                        h = _hidden_arg(args, kwargs)
                        b, p = _rows(h, positions)
                        store[layer] = h[b, p].float()

                handles.append(arch.layers[layer].register_forward_pre_hook(pre, with_kwargs=True))
        yield store


@contextlib.contextmanager
def add_to_attention_output(
    arch: Arch, deltas: Mapping[int, torch.Tensor], positions: torch.Tensor
) -> Iterator[None]:
    """Add ``deltas[l]`` (``[d_model]`` or ``[B, d_model]``) to layer ``l``'s attention output at
    ``positions``, on every forward call inside the block."""
    _layers(arch, deltas.keys())
    _check_deltas(arch, deltas)
    handles: list = []
    with registered(handles):
        for layer, delta in deltas.items():
            def hook(_m, _args, out, delta=delta):
                o = out[0] if isinstance(out, tuple) else out
                b, p = _rows(o, positions)
                o = o.clone()
                o[b, p] = (o[b, p].float() + delta.to(o.device, torch.float32)).to(o.dtype)
                return (o, *out[1:]) if isinstance(out, tuple) else o

            handles.append(arch.out_proj[layer].register_forward_hook(hook))
        yield


@contextlib.contextmanager
def edit_heads(
    arch: Arch,
    heads: Mapping[int, Iterable[int]],
    positions: torch.Tensor,
    values: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Zero (default) or replace chosen heads' slices of ``z_l`` at ``positions``.

    ``heads[l]`` lists head indices of layer ``l``; ``values[l]`` (optional) is ``[len(heads[l]), d_h]`` or
    ``[B, len(heads[l]), d_h]`` holding the replacement ``z`` slices. Applies on every call in the block."""
    plan = []
    for layer, hs in heads.items():
        _layers(arch, [layer])
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
        plan.append((layer, cols, val, len(hs)))
    handles: list = []
    with registered(handles):
        for layer, cols, val, n in plan:
            def pre(_m, args, kwargs, cols=cols, val=val, n=n):
                z = _hidden_arg(args, kwargs)
                b, p = _rows(z, positions)
                z = z.clone()
                c = cols.to(z.device)
                if val is None:
                    z[b[:, None], p[:, None], c[None, :]] = 0
                else:
                    v = val.to(z.device, z.dtype).reshape(-1, n * arch.d_head)
                    z[b[:, None], p[:, None], c[None, :]] = v.expand(z.shape[0], -1)
                return _with_hidden(args, kwargs, z)

            handles.append(arch.out_proj[layer].register_forward_pre_hook(pre, with_kwargs=True))
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
