"""Edits at the last prompt position ``p(x)``: what head ablation and the Backdoor Vector do to a forward pass.

Two primitive edits act on layer ``l``'s attention at ``p(x)``:

* **zero heads** -- set head ``h``'s slice of ``z_l`` (the input of the output projection) to 0, which removes
  its contribution ``a_{l,h} = W_O^l[:, h] z_{l,h}`` from the attention output (the bias stays);
* **add a vector** -- add ``delta`` (in ``R^d``) to the attention output (after the bias).

An :class:`Edit` bundles both for any number of layers. Sweeps run many edits at once by stacking their rows
in one batch (edit-major: rows ``g*B .. g*B+B-1`` carry edit ``g``), so the hooks here take *per-row* masks
and vectors: :func:`zero_heads_rowwise` and :func:`rowwise_context`. :func:`add_at_prefill_end` adds a
vector at the last position of every multi-token forward call only -- the prefill of a left-padded batch,
whose last position is ``p(x)`` -- and leaves single-token decode steps alone, so it can wrap a whole
``generate`` call. Every hook is registered inside a context manager and removed on exit
(:func:`bkdattr.hooks.registered`), even when the block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..arch import Arch
from ..errors import ConfigError
from ..hooks import _check_deltas, _hidden_arg, _rows, _with_hidden, add_to_attention_output, edit_heads, registered


@dataclass
class Edit:
    """One intervention at ``p(x)``: ``heads[l]`` lists the heads of layer ``l`` whose ``z`` slice is zeroed;
    ``deltas[l]`` is a float32 ``[d_model]`` vector added to layer ``l``'s attention output. ``name`` labels
    the edit in results. The empty edit is the unedited model."""

    heads: dict[int, list[int]] = field(default_factory=dict)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)
    name: str = ""

    @classmethod
    def ablate(cls, heads: Iterable[tuple[int, int]], name: str = "") -> Edit:
        """Zero the listed ``(layer, head)`` pairs."""
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(int(layer), []).append(int(head))
        return cls(heads={k: sorted(set(v)) for k, v in sorted(by_layer.items())}, name=name)

    @classmethod
    def add(cls, layer: int, vector: torch.Tensor, alpha: float = 1.0, name: str = "") -> Edit:
        """Add ``alpha * vector`` (``[d_model]``) at layer ``layer``'s attention output."""
        return cls(deltas={int(layer): (float(alpha) * vector.detach().float()).reshape(-1)}, name=name)

    @property
    def is_identity(self) -> bool:
        return not any(self.heads.values()) and not self.deltas

    def check(self, arch: Arch) -> None:
        """Raise a one-line :class:`ConfigError` when a layer, head or vector does not fit ``arch``."""
        for layer, hs in self.heads.items():
            if not 0 <= layer < arch.n_layers:
                raise ConfigError(f"edit '{self.name}': layer {layer} does not exist (layers 0..{arch.n_layers - 1})")
            if any(not 0 <= h < arch.n_heads for h in hs):
                raise ConfigError(f"edit '{self.name}': heads {hs} of layer {layer} out of range "
                                  f"(0..{arch.n_heads - 1})")
        for layer, d in self.deltas.items():
            if not 0 <= layer < arch.n_layers:
                raise ConfigError(f"edit '{self.name}': layer {layer} does not exist (layers 0..{arch.n_layers - 1})")
            if tuple(d.shape) != (arch.d_model,):
                raise ConfigError(f"edit '{self.name}': vector of shape {tuple(d.shape)} at layer {layer}; "
                                  f"expected [{arch.d_model}]")

    @contextlib.contextmanager
    def context(self, arch: Arch, positions: torch.Tensor) -> Iterator[None]:
        """Apply this edit to every row at ``positions`` (``[B]``) of every forward call in the block, with the
        plain hooks of :mod:`bkdattr.hooks` (the reference path the batched sweep is tested against)."""
        self.check(arch)
        with contextlib.ExitStack() as stack:
            if any(self.heads.values()):
                stack.enter_context(edit_heads(arch, self.heads, positions))
            if self.deltas:
                stack.enter_context(add_to_attention_output(arch, self.deltas, positions))
            yield


@contextlib.contextmanager
def zero_heads_rowwise(arch: Arch, masks: Mapping[int, torch.Tensor], positions: torch.Tensor) -> Iterator[None]:
    """Zero head slices of ``z_l`` at ``positions`` row by row: ``masks[l]`` is bool ``[B, H]``, True where
    head ``h`` of row ``b`` is zeroed. Applies on every forward call inside the block."""
    for layer, m in masks.items():
        if m.dim() != 2 or m.shape[1] != arch.n_heads:
            raise ConfigError(f"head mask of layer {layer} has shape {tuple(m.shape)}; "
                              f"expected [batch, {arch.n_heads}]")
    handles: list = []
    with registered(handles):
        for layer, m in masks.items():
            def pre(_m, args, kwargs, m=m):
                z = _hidden_arg(args, kwargs)
                b, p = _rows(z, positions)
                z = z.clone()
                zp = z[b, p].reshape(z.shape[0], arch.n_heads, arch.d_head)
                zp = torch.where(m.to(z.device)[:, :, None], torch.zeros((), dtype=z.dtype, device=z.device), zp)
                z[b, p] = zp.reshape(z.shape[0], -1)
                return _with_hidden(args, kwargs, z)

            handles.append(arch.out_proj[layer].register_forward_pre_hook(pre, with_kwargs=True))
        yield


@contextlib.contextmanager
def rowwise_context(arch: Arch, edits: Sequence[Edit], rows_per_edit: int, positions: torch.Tensor) -> Iterator[None]:
    """Apply ``edits[g]`` to rows ``g*rows_per_edit .. (g+1)*rows_per_edit - 1`` at ``positions``
    (``[len(edits) * rows_per_edit]``). Rows of an edit that leaves a layer alone get a zero delta / no mask
    there, which is exact."""
    n_rows = len(edits) * rows_per_edit
    masks: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}
    for g, e in enumerate(edits):
        e.check(arch)
        rows = slice(g * rows_per_edit, (g + 1) * rows_per_edit)
        for layer, hs in e.heads.items():
            if hs:
                m = masks.setdefault(layer, torch.zeros(n_rows, arch.n_heads, dtype=torch.bool))
                m[rows, hs] = True
        for layer, d in e.deltas.items():
            t = deltas.setdefault(layer, torch.zeros(n_rows, arch.d_model, dtype=torch.float32))
            t[rows] = d.float().reshape(1, -1)
    with contextlib.ExitStack() as stack:
        if masks:
            stack.enter_context(zero_heads_rowwise(arch, masks, positions))
        if deltas:
            stack.enter_context(add_to_attention_output(arch, deltas, positions))
        yield


@contextlib.contextmanager
def add_at_prefill_end(arch: Arch, deltas: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Add ``deltas[l]`` (``[d_model]`` or ``[B, d_model]``) to layer ``l``'s attention output at the **last
    position** of every forward call that processes more than one token. Under left padding that position is
    ``p(x)`` of every row; single-token calls (decode steps with a KV cache) are left unedited."""
    for layer in deltas:
        if not 0 <= int(layer) < arch.n_layers:
            raise ConfigError(f"layer {layer} does not exist (the model has layers 0..{arch.n_layers - 1})")
    _check_deltas(arch, deltas)
    handles: list = []
    with registered(handles):
        for layer, delta in deltas.items():
            def hook(_m, _args, out, delta=delta):
                o = out[0] if isinstance(out, tuple) else out
                if o.shape[1] < 2:
                    return None
                o = o.clone()
                o[:, -1] = (o[:, -1].float() + delta.to(o.device, torch.float32)).to(o.dtype)
                return (o, *out[1:]) if isinstance(out, tuple) else o

            handles.append(arch.out_proj[int(layer)].register_forward_hook(hook))
        yield
