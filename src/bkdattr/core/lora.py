"""LoRA adapters: check an adapter folder, merge an adapter into its base model in float32.

One merge serves both ``bkdattr inject`` (after training) and loading a model with ``--adapter``, so an audited
base + adapter has the very weights the inject stage saved: every LoRA linear layer is merged as
``(W.float() + scaling * B.float() @ A.float())`` and cast once to ``W``'s dtype.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ModelLoadError, first_line


def check_adapter_folder(adapter: str, weights: bool = True) -> None:
    """One-line :class:`ModelLoadError` for a missing adapter folder, one without ``adapter_config.json`` and
    (``weights``) one without ``adapter_model.safetensors``/``.bin``."""
    p = Path(adapter).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"adapter folder not found: {adapter}; check the path")
    if not (p / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter folder '{adapter}' has no adapter_config.json; pass a folder saved by peft")
    if weights and not any((p / f"adapter_model.{ext}").is_file() for ext in ("safetensors", "bin")):
        raise ModelLoadError(f"adapter folder '{adapter}' has no adapter_model.safetensors; save the adapter again "
                             "with peft's save_pretrained")


def merge_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """``model`` with the LoRA adapter folder ``adapter`` merged in float32 (:func:`merge_lora_fp32`, the merge of
    ``bkdattr inject``: the same weights); one-line :class:`ModelLoadError` when the adapter does not fit."""
    from peft import PeftModel  # lazy: peft takes seconds to import; only a model with an adapter needs it

    check_adapter_folder(adapter)
    try:
        with warnings.catch_warnings():  # peft calls a deprecated transformers helper
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()))
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        msg = first_line(e)
        raise ModelLoadError(
            f"adapter '{adapter}' does not fit this model ({msg[:200]}); use the base model it was trained on"
        ) from None
    check_adapter_keys(peft_model, adapter)
    return merge_lora_fp32(peft_model)[0]  # the float32 merge of 'bkdattr inject': the same weights


def check_adapter_keys(peft_model, adapter: str) -> None:
    """peft only warns when saved adapter weights find no module (or modules get no saved weight); refuse."""
    from peft.utils import get_peft_model_state_dict  # lazy: as PeftModel above

    file = Path(adapter).expanduser() / "adapter_model.safetensors"
    if not file.is_file():
        return
    with safe_open(str(file), "pt") as f:
        saved = set(f.keys())
    have = set(get_peft_model_state_dict(peft_model).keys())
    unused, unfilled = sorted(saved - have), sorted(have - saved)
    if unused or unfilled:
        what = (f"{len(unused)} saved weights have no place in it, e.g. {unused[0]}" if unused
                else f"{len(unfilled)} adapter weights are not in the file, e.g. {unfilled[0]}")
        raise ModelLoadError(f"adapter '{adapter}' does not fit this model ({what}); use the base model it was "
                             "trained on")


def lora_delta(module, adapter: str) -> torch.Tensor | None:
    """The float32 update ``scaling * B A`` of one peft LoRA linear layer (``[out, in]`` of its base weight), or
    None for a layer this merge does not handle (DoRA, convolutions, embeddings: left to peft)."""
    if getattr(module, "use_dora", {}).get(adapter) or adapter not in getattr(module, "lora_A", {}):
        return None
    a, b = module.lora_A[adapter], module.lora_B[adapter]
    if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
        return None
    delta = (b.weight.float() @ a.weight.float()) * float(module.scaling[adapter])  # [out, in]
    return delta.T if getattr(module, "fan_in_fan_out", False) else delta


@torch.no_grad()
def merge_lora_fp32(peft_model) -> tuple[torch.nn.Module, float]:
    """Merge every LoRA linear layer into its base weight as ``(W.float() + scaling * B.float() @ A.float())``,
    cast once to ``W``'s dtype (a bfloat16 ``W`` is rounded once, never ``delta`` first and then the sum), then
    drop the adapters. Returns ``(base model, share of the update's nonzero entries that rounding erased)``: 0
    for float32 weights; for bfloat16 weights a LoRA update below half a unit in the last place of ``W`` is lost,
    whatever the merge order, which is why injecting on GPU should use ``--dtype float32``."""
    lost = kept = 0
    pending = []
    for module in peft_model.modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue
        deltas = [d for d in (lora_delta(module, ad) for ad in module.active_adapters) if d is not None]
        if len(deltas) != len(module.active_adapters):
            pending.append(module)  # peft merges what this function does not handle
            continue
        w = base.weight
        delta = sum(deltas).to(w.device)
        new = (w.float() + delta).to(w.dtype)
        moved = delta != 0
        lost += int((moved & (new == w)).sum())
        kept += int(moved.sum())
        w.copy_(new)
    for module in pending:
        module.merge()
    model = peft_model.unload()  # removes the LoRA layers without merging them (done above)
    return model, (lost / kept if kept else 0.0)
