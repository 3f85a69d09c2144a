"""Edits at the last prompt position ``p(x)``: what head ablation and the Backdoor Vector do to a forward pass.

Two primitive edits act on layer ``l``'s attention at ``p(x)``:

* **zero heads** -- set head ``h``'s slice of ``z_l`` (the input of the output projection) to 0, which removes
  its contribution ``a_{l,h} = W_O^l[:, h] z_{l,h}`` from the attention output (the bias stays);
* **add a vector** -- add ``delta`` (in ``R^d``) to the attention output (after the bias).

An :class:`Edit` bundles both for any number of layers. Sweeps run many edits at once by stacking their rows
in one batch (edit-major: rows ``g*B .. g*B+B-1`` carry edit ``g``): :func:`rowwise_context` turns a list of
edits into the *per-row* head masks and vectors of :func:`bkdattr.core.hooks.zero_heads_rowwise` and
:func:`bkdattr.core.hooks.add_to_attention_output`. Every hook lives in :mod:`bkdattr.core.hooks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..core.arch import Arch
from ..core.errors import ConfigError
from ..core.hooks import add_to_attention_output, edit_heads, zero_heads_rowwise


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
        for layer in [*self.heads, *self.deltas]:
            if not 0 <= layer < arch.n_layers:
                raise ConfigError(f"edit '{self.name}': layer {layer} does not exist (layers 0..{arch.n_layers - 1})")
        for layer, hs in self.heads.items():
            if any(not 0 <= h < arch.n_heads for h in hs):
                raise ConfigError(f"edit '{self.name}': heads {hs} of layer {layer} out of range "
                                  f"(0..{arch.n_heads - 1})")
        for layer, d in self.deltas.items():
            if tuple(d.shape) != (arch.d_model,):
                raise ConfigError(f"edit '{self.name}': vector of shape {tuple(d.shape)} at layer {layer}; "
                                  f"expected [{arch.d_model}]")

    @contextlib.contextmanager
    def context(self, arch: Arch, positions: torch.Tensor) -> Iterator[None]:
        """Apply this edit to every row at ``positions`` (``[B]``) of every forward call in the block, with the
        plain hooks of :mod:`bkdattr.core.hooks` (the reference path the batched sweep is tested against)."""
        self.check(arch)
        with contextlib.ExitStack() as stack:
            if any(self.heads.values()):
                stack.enter_context(edit_heads(arch, self.heads, positions))
            if self.deltas:
                stack.enter_context(add_to_attention_output(arch, self.deltas, positions))
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
