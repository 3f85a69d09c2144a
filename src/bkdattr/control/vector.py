"""The Backdoor Vector: the summed mean output of the backdoor heads, added or subtracted at one layer.

With ``abar_{l,h}`` the mean contribution of head ``(l, h)`` at ``p(x)`` over the poisoned (triggered)
**training** prompts (:func:`bkdattr.attribution.means.mean_contributions`, the same function BAHA uses), the
Backdoor Vector of a head set ``S`` (the top-k heads
by ACIE; default ~3% of all heads) is

    v = sum_{(l,h) in S} abar_{l,h}            (a vector in R^d, d = d_model)

At one layer ``l*``, at ``p(x)`` and on the prefill pass only, ``alpha * v`` is added to the attention output
(on clean prompts the backdoor should fire: *activation*) or subtracted (on triggered prompts it should stop:
*neutralisation*). Two controls separate a backdoor direction from a generic perturbation: a random vector of
the same norm (:func:`random_like`) and the vector of k random heads (:func:`build_vector` on random heads).

:func:`apply_vector` applies a vector from Python to any prompts (for :func:`bkdattr.core.generation.generate`:
``edit=lambda b: apply_vector(lm, v, layer, alpha, positions=b.last_pos)``, or around the whole call);
:func:`save_vector` / :func:`load_vector` keep it as safetensors with its provenance (which model, which heads,
which prompts).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.arch import Arch
from ..core.errors import ArtifactError, ConfigError
from ..core.hooks import add_to_attention_output
from ..core.io import load_tensors, save_tensors, tensor_metadata, write_json


def _arch(lm_or_arch) -> Arch:
    if isinstance(lm_or_arch, Arch):
        return lm_or_arch
    arch = getattr(lm_or_arch, "arch", None)
    if not isinstance(arch, Arch):
        raise ConfigError("pass a LoadedModel (bkdattr.core.models.load_model) or its Arch")
    return arch


def build_vector(abar: torch.Tensor, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``v = sum_{(l,h) in heads} abar[l, h]``: float32 ``[d_model]`` from ``abar`` ``[L, H, d_model]``."""
    if abar.dim() != 3:
        raise ConfigError(f"mean contributions must be [layers, heads, d_model], got {tuple(abar.shape)}")
    if not heads:
        raise ConfigError("the Backdoor Vector needs at least one head; raise k")
    idx_l = torch.tensor([int(h[0]) for h in heads])
    idx_h = torch.tensor([int(h[1]) for h in heads])
    if int(idx_l.max()) >= abar.shape[0] or int(idx_h.max()) >= abar.shape[1] or min(idx_l.min(), idx_h.min()) < 0:
        raise ConfigError(f"a head in {list(heads)[:4]}... lies outside the model's {abar.shape[0]} layers x "
                          f"{abar.shape[1]} heads; the ranking belongs to another model")
    return abar[idx_l, idx_h].float().sum(0)


def random_like(v: torch.Tensor, seed: int) -> torch.Tensor:
    """A random direction (seeded Gaussian) scaled to ``v``'s norm: float32 ``[d_model]``."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn(v.shape[-1], generator=g, dtype=torch.float32)
    return r / r.norm() * v.float().norm()


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[tuple[int, int]]:
    """``k`` distinct heads drawn uniformly from all ``n_layers * n_heads`` (seeded; a prefix of one
    permutation, so smaller k give nested sets)."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_layers * n_heads, generator=g)[:k].tolist()
    return [(i // n_heads, i % n_heads) for i in perm]


@dataclass
class BackdoorVector:
    """A Backdoor Vector ``vector`` (float32 ``[d_model]``), the ``heads`` ``[(layer, head), ...]`` it sums,
    and ``provenance`` (model, run, prompts, ranking; JSON-serialisable)."""

    vector: torch.Tensor
    heads: list[tuple[int, int]]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def norm(self) -> float:
        return float(self.vector.float().norm())


def save_vector(path: str | Path, bv: BackdoorVector) -> Path:
    """Write ``bv`` as safetensors (tensors ``vector`` and ``heads``; provenance JSON in the metadata) plus a
    readable ``<name>.json`` beside it, both atomically."""
    path = Path(path)
    prov = {**bv.provenance, "heads": [list(map(int, h)) for h in bv.heads], "norm": bv.norm,
            "d_model": int(bv.vector.numel())}
    heads = torch.tensor(bv.heads, dtype=torch.long).reshape(-1, 2)
    save_tensors(path, {"vector": bv.vector.float().reshape(-1), "heads": heads},
                 metadata={"format": "bkdattr.backdoor_vector.v1", "provenance": json.dumps(prov)})
    write_json(path.with_suffix(".json"), prov)
    return path


def load_vector(path: str | Path, d_model: int | None = None) -> BackdoorVector:
    """Read a vector written by :func:`save_vector`; ``d_model`` (optional) must match its size."""
    t = load_tensors(path)
    if "vector" not in t or "heads" not in t:
        raise ArtifactError(f"{path}: not a bkdattr Backdoor Vector (tensors 'vector' and 'heads' missing)")
    prov = json.loads(tensor_metadata(path).get("provenance", "{}"))
    v = t["vector"].float()
    if d_model is not None and v.numel() != d_model:
        raise ArtifactError(f"{path}: vector of size {v.numel()} does not fit a model with d_model={d_model}; "
                            "build the vector for this model")
    return BackdoorVector(v, [(int(a), int(b)) for a, b in t["heads"].tolist()], prov)


@contextlib.contextmanager
def apply_vector(lm_or_arch, v: torch.Tensor | BackdoorVector, layer: int, alpha: float = 1.0,
                 positions: torch.Tensor | None = None) -> Iterator[None]:
    """Add ``alpha * v`` to layer ``layer``'s attention output at ``p(x)`` while the block runs (use a
    negative ``alpha`` to subtract). Hooks are removed on exit, also after an exception.

    ``positions=None``: at the last position of every forward call over more than one token -- the prefill of
    a left-padded batch (what :func:`bkdattr.core.generation.generate` builds), where it is ``p(x)`` -- so a whole
    ``generate`` call can run inside the block and its decode steps stay unedited. ``positions`` (``[B]``):
    at those indices of every forward call (for a single teacher-forced or prefill pass)."""
    vec = (v.vector if isinstance(v, BackdoorVector) else v).detach().float().reshape(-1)
    with add_to_attention_output(_arch(lm_or_arch), {int(layer): float(alpha) * vec}, positions):
        yield
