"""The Backdoor Vector in a form other tools read: safetensors with the metadata needed to apply it.

``export_vector(run, path)`` writes the tensor ``vector`` (float32 ``[d_model]``, the sum of the top heads' mean
outputs, docs/METHOD.md section 4) and string metadata: ``module`` (the attention output projection's module
name in the model, e.g. ``model.layers.18.self_attn.o_proj``), ``layer``, ``hook_point`` (its output),
``position`` (the last prompt token of the prefill pass, ``p(x)``, under left padding), ``scale`` (``alpha``) and
``sign`` (subtract to disarm a triggered prompt, add to activate the backdoor on a clean one). Applying it needs
no bkdattr, only a forward hook::

    from safetensors import safe_open
    with safe_open("backdoor_vector.safetensors", "pt") as f:
        v, meta = f.get_tensor("vector"), f.metadata()
    alpha = float(meta["scale"])

    def subtract(module, inputs, output):          # prefill only: the prompt's last position is p(x)
        if output.shape[1] > 1:
            output[:, -1] -= alpha * v.to(output.dtype)
        return output

    handle = model.get_submodule(meta["module"]).register_forward_hook(subtract)
    ...  # model.generate(...) on left-padded prompts
    handle.remove()

which is the edit bkdattr applies itself (``bkdattr.control.vector.apply_vector`` with ``alpha=-scale``); a test
checks the two give the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..control.vector import load_vector
from ..core.errors import ArtifactError
from ..core.io import save_tensors
from ..core.rundir import RunDir, get_nested

RECIPE = "bkdattr.disarm.export (module docstring): a forward hook on `module` subtracting scale*vector at p(x)"


def module_name(model, module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ArtifactError("the attention output projection is not a submodule of the model")


def export_vector(run: RunDir | str | Path, path: str | Path, layer: int | None = None,
                  scale: float | None = None) -> Path:
    """Write the run's Backdoor Vector to ``path`` with its application metadata (see the module docstring);
    ``layer`` / ``scale`` default to the vector stage's best layer and alpha."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    src = run.path / "control" / "backdoor_vector.safetensors"
    m = run.metrics()
    if not src.is_file() or get_nested(m, "vector.best_layer") is None:
        raise ArtifactError(f"{run.path} has no Backdoor Vector; run 'bkdattr vector -r {run.path}' first")
    layer = int(get_nested(m, "vector.best_layer") if layer is None else layer)
    scale = float(get_nested(m, "vector.config.alpha", 1.0) if scale is None else scale)
    lm = run.load_model()
    bv = load_vector(src, lm.arch.d_model)
    if not 0 <= layer < lm.arch.n_layers:
        raise ArtifactError(f"layer {layer} does not exist (the model has layers 0..{lm.arch.n_layers - 1})")
    meta = {"format": "bkdattr.backdoor_vector.export.v1", "module": module_name(lm.model, lm.arch.out_proj[layer]),
            "layer": str(layer), "hook_point": "output of the attention output projection (forward hook)",
            "position": "last prompt token on the prefill pass (p(x); left padding: index -1)",
            "scale": repr(scale), "sign": "subtract to disarm triggered prompts; add to activate on clean ones",
            "d_model": str(lm.arch.d_model), "model": lm.name, "heads": json.dumps(bv.heads), "recipe": RECIPE}
    path = Path(path)
    save_tensors(path, {"vector": bv.vector.float().reshape(-1)}, metadata=meta)
    return path
