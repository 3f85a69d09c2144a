"""The run folder: one (model, task) analysed end to end.

Layout (each stage owns its subfolder; every file is written atomically)::

    RUN/
      run.json            what the run is: base model spec, task kind, profile, seed, resolved config
      metrics.json        nested results; stage sections: inject (or audit), probe, attribution, ablation, vector,
                          timings ({stage: seconds}, plus peak_rss_mb / cuda_peak_mb: {stage: MiB})
      data/               splits written by inject or audit (JSONL)
      model/              the merged backdoored model (safetensors + tokenizer); not in an audit run
      adapter/            the trained LoRA adapter (peft format), so the run can be audited from scratch
      probe/ attribution/ control/ figures/   stage artifacts
      report.html  report.md

An **audit run** (``bkdattr audit``, :mod:`bkdattr.audit`) has ``source: audit`` in ``run.json`` and no ``model/``:
its model (and the clean reference, when there is one) are loaded from the
:class:`~bkdattr.core.model_source.ModelSource` recorded there, after checking that the files did not change.

``metrics.json`` keys named with dots in the docs (``probe.mlp.in_layer_accuracy``) are nested objects.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from .errors import InputFileError
from .io import read_json, write_json
from .model_source import ModelSource, load_source
from .models import load_model


class RunDir:
    """Paths and metrics of a run folder."""

    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise InputFileError(f"run folder not found: {self.path}; create it with 'bkdattr inject --out {path}'")

    def sub(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def figures_dir(self) -> Path:
        d = self.path / "figures"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ---- run.json -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        p = self.path / "run.json"
        if not p.is_file():
            raise InputFileError(f"{p} missing: {self.path} is not a bkdattr run; run 'bkdattr inject' first")
        return read_json(p)

    def write_info(self, info: dict[str, Any]) -> None:
        write_json(self.path / "run.json", info)

    # ---- metrics.json ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        p = self.path / "metrics.json"
        return read_json(p) if p.is_file() else {}

    def update_metrics(self, section: str, values: dict[str, Any]) -> dict[str, Any]:
        """Replace ``metrics[section]`` (a dotted name nests: ``probe.control``) under a file lock."""
        lock = self.path / ".metrics.lock"
        with open(lock, "a") as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            try:
                m = self.metrics()
                node = m
                keys = section.split(".")
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = values
                write_json(self.path / "metrics.json", m)
                return m
            finally:
                fcntl.flock(lf, fcntl.LOCK_UN)

    @property
    def is_audit(self) -> bool:
        return self.info().get("source") == "audit"

    def has_clean_reference(self) -> bool:
        """Whether the run names a clean model to compare with (an audit without one does not)."""
        info = self.info()
        return info.get("source") != "audit" or bool(info.get("clean_reference"))

    def load_model(self, device: str = "cpu", dtype: str | None = None):
        """The backdoored (merged) model of this run (an audit run: the audited model, fingerprint checked)."""
        info = self.info()
        if info.get("source") == "audit":
            return load_source(ModelSource.from_dict(info["model_source"]), device, dtype)
        if not (self.model_dir / "config.json").is_file():
            raise InputFileError(f"{self.model_dir} has no model; run 'bkdattr inject --out {self.path}' first")
        return load_model(str(self.model_dir), device=device, dtype=dtype)

    def load_base_model(self, device: str = "cpu", dtype: str | None = None):
        """The clean base model the backdoor was injected into (for controls); an audit run's clean reference."""
        info = self.info()
        if info.get("source") == "audit":
            if not info.get("clean_reference"):
                raise InputFileError(f"the audit {self.path} has no clean reference model; audit with --adapter or "
                                     "--base-model to compare with one")
            return load_source(ModelSource.from_dict(info["clean_reference"]), device, dtype)
        return load_model(info["base_model"], device=device, dtype=dtype)


def get_nested(d: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = d
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node
