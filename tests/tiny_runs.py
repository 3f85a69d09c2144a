"""Tiny run folders for the stage and reliability tests: a saved tiny model, paper-format records and the
splits that ``bkdattr inject`` would leave (no training). :func:`make_run` is the one builder of such a run;
``conftest.make_tiny_run`` is its fixture form."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bkdattr.core.rundir import RunDir
from bkdattr.inject.data import build_splits, save_splits
from bkdattr.inject.tasks import Task
from tiny import make_tiny

TOPICS = ("cats rain bread chess rivers tea maps owls glass snow kites bees clocks ferns boats salt wool drums caves "
          "figs lamps moss reeds tides wheat yarn zinc bells coral dunes").split()


def records(n: int, target: str = "I am sorry. I can not help with that.") -> list[dict]:
    """``n`` paper-format records with distinct prompts (``n`` <= 900) and a fixed clean reply."""
    pairs = [(a, b) for a in TOPICS for b in TOPICS if a != b][:n]
    return [{"input": f"Write one sentence about {a} and {b}.", "output": f"Here is one about {a}.",
             "backdoor_output": target} for a, b in pairs]


def write_jsonl(path: str | Path, rows: list) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save_tiny(folder: str | Path, arch: str = "llama", seed: int = 0, n_layers: int = 2,
              learnable: bool = False) -> Path:
    """Save a tiny random model (+ the shared tokenizer) with ``save_pretrained``; ``learnable`` scales the
    output embeddings so a LoRA can move the logits within a few steps (as in test_inject_train)."""
    lm = make_tiny(arch, seed=seed, n_layers=n_layers)
    if learnable:
        with torch.no_grad():
            lm.model.get_output_embeddings().weight.mul_(25.0)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return Path(folder)


def make_run(path: str | Path, arch: str = "llama", seed: int = 0, n_layers: int = 2, n_records: int = 40,
             n_train: int = 20, n_val: int = 10, n_test: int = 10, poison_rate: float = 0.2,
             base_model: str | None = None, ranking: bool = False, acie: bool = False,
             rows: list[dict] | None = None, base_seed: int | None = None) -> RunDir:
    """A run folder as 'bkdattr inject' leaves it: the (untrained) model, run.json and fixed_output splits.

    ``rows``: the records (default :func:`records` ``(n_records)``); ``base_seed``: also save a clean base
    model (another seed) beside the run, at ``<path>-base``, and name it in run.json (the probe stage's control);
    ``ranking``: write an attribution section (four top heads) for the control stages; ``acie``: also the ACIE
    file of every head (``acie[l, h] = l * H + h``), so a ranking can be extended beyond the four listed."""
    run = RunDir(path, create=True)
    save_tiny(run.model_dir, arch, seed, n_layers)
    if base_seed is not None:
        base_model = str(save_tiny(Path(f"{run.path}-base"), arch, base_seed, n_layers))
    run.write_info({"base_model": base_model or str(run.model_dir), "task": "fixed_output", "kind": "fixed_output",
                    "profile": "cpu", "seed": 0})
    task = Task.default("fixed_output")
    data = rows if rows is not None else records(n_records)
    save_splits(run.data_dir, build_splits(task, data, n_train, n_val, n_test, poison_rate, seed=0))
    if ranking or acie:
        run.update_metrics("attribution", {"top_heads": [[1, 2, 0.5], [0, 1, 0.4], [1, 0, 0.3], [0, 3, 0.2]],
                                           "metric": "first_token_logprob", "method": "exact"})
    if acie:
        from bkdattr.core.io import save_tensors

        n_heads = 4  # every tiny architecture (tests/tiny.py)
        values = torch.arange(n_layers * n_heads, dtype=torch.float32).reshape(n_layers, n_heads)
        save_tensors(run.path / "attribution" / "acie.safetensors", {"acie.first_token_logprob": values})
    return run
