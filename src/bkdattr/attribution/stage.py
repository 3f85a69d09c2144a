"""The ``attribute`` stage: BAHA on a run folder.

Inputs (from ``bkdattr inject``): the merged backdoored model ``RUN/model`` and the splits ``RUN/data``
(:func:`bkdattr.inject.data.load_splits`).

* ``abar`` is averaged over the *triggered* training prompts (``Example.triggered`` of ``splits.train``; for
  label_flip only the source-label rows, whose label the trigger flips), a seeded sample of at most
  ``n_mean_prompts``.
* ACIE is averaged over a seeded sample of ``n_prompts`` *clean* held-out prompts (``prompt_split``, default
  ``val``; rows whose backdoor reply equals the clean reply are skipped) with target
  ``Example.backdoor_output``.

Outputs (rank 0 writes, atomically): ``RUN/attribution/acie.safetensors`` (``acie.<metric>`` ``[L, H]``,
``cie.<metric>`` ``[N, L, H]``, ``clean.<metric>`` ``[N]``), ``RUN/attribution/abar.safetensors``
(``abar`` ``[L, H, d]``), ``RUN/attribution/attribution.json`` (top heads per metric, prompt uids, settings),
``RUN/figures/attribution_acie.png`` and the ``attribution`` section of ``metrics.json`` (``method``,
``metric``, ``top_heads`` as ``[layer, head, acie]`` best first, ``seconds``, ...).

Scale-out: under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this stage and the heads are sharded;
``workers > 1`` spawns that many local processes instead (:func:`bkdattr.core.distributed.run_workers`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console

from ..core.devices import local_rank_from_env, rank_device, visible_gpus
from ..core.distributed import (
    backend_for,
    barrier,
    init_from_env,
    is_distributed,
    is_main,
    rank_world,
    run_workers,
    shutdown,
)
from ..core.errors import ConfigError, DataError
from ..core.io import save_tensors, write_json
from ..core.options import StageOptions, opt
from ..core.rundir import RunDir
from ..core.runtime import set_threads
from ..inject.data import load_splits, sample_examples
from .baha import METHODS, AttributionResult, attribute
from .exact import STRATEGIES
from .exact_memory import plan_exact
from .figures import FIGURE_NAME, plot_acie, top_table
from .means import mean_contributions
from .scores import DEFAULT_METRIC, METRICS, check_metric


@dataclass
class AttributeConfig(StageOptions):
    """Options of the attribute stage (plus the run-wide ones of :class:`~bkdattr.core.options.StageOptions`);
    None sizes take the profile's value (:mod:`bkdattr.core.profiles`)."""

    stage = "attribute"
    method: str = opt("exact", "exact (fast, same numbers as reference), reference (one full pass per head) or "
                      "attribution (first-order estimate)")
    metric: str = opt(DEFAULT_METRIC, "ranking metric: first_token_logprob, geomean_prob (paper) or sum_logprob")
    metrics: list[str] | None = opt(None, "scores exact or attribution computes for every head (default all "
                                    "three, or the ranking metric alone with refine_top)")
    refine_top: int | None = opt(None, "exact two-pass: rank every head by metric, then all metrics for the top "
                                 "N (0: one pass with every metric)")
    n_prompts: int | None = opt(None, "clean held-out attribution prompts")
    n_mean_prompts: int | None = opt(None, "triggered training prompts for abar (0: all)")
    prompt_split: str = opt("val", "split of the attribution prompts: val, test or train")
    batch_size: int = opt(8, "prompts per chunk (on one GPU the exact sweep may lower it to fit the free memory, "
                          "unless heads_per_pass is given)")
    mean_batch_size: int = opt(16, "prompts per forward pass of the mean contributions")
    top_k: int = opt(16, "heads listed in the table and metrics.json")
    strategy: str = opt("auto", "exact path: auto, layers, prefix or full")
    heads_per_pass: int | None = opt(None, "exact: heads patched per pass (default: a whole layer; on one GPU, what "
                                     "fits the free memory)")
    workers: int = opt(1, "local processes sharing the heads (torch.distributed)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}")
        check_metric(self.metric)
        for m in self.metrics or []:
            check_metric(m)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown exact strategy '{self.strategy}'; use one of {', '.join(STRATEGIES)}")
        if self.prompt_split not in ("val", "test", "train"):
            raise ConfigError(f"prompt_split '{self.prompt_split}' must be val, test or train")
        for name in ("batch_size", "mean_batch_size", "top_k", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be >= 1")
        if self.refine_top < 0:
            raise ConfigError(f"refine_top {self.refine_top} must be >= 0 (0: one pass over every head)")
        if self.n_prompts < 1 or self.n_mean_prompts < 0:
            raise ConfigError("n_prompts must be >= 1 and n_mean_prompts >= 0 (0: every training prompt)")


def select_examples(splits, cfg: AttributeConfig) -> tuple[list, list]:
    """``(clean attribution examples, examples whose triggered prompts give abar)`` for a run's splits."""
    task = splits.task
    pool = [e for e in task.eval_subset(getattr(splits, cfg.prompt_split))
            if e.backdoor_output.strip() and e.backdoor_output.strip() != e.output.strip()]
    if not pool:
        raise DataError(f"no {cfg.prompt_split} prompt has a backdoor reply different from its clean reply; "
                        "choose another prompt_split")
    clean = sample_examples(pool, cfg.n_prompts, cfg.seed)
    mean_pool = task.eval_subset(splits.train) or list(splits.train)
    if not mean_pool:
        raise DataError("the run has no training prompts to average triggered contributions over")
    return clean, sample_examples(mean_pool, cfg.n_mean_prompts, cfg.seed + 1)


def attribute_run(run: RunDir, cfg: AttributeConfig) -> AttributionResult:
    """Run BAHA on ``run`` with ``cfg`` (in this process, joining torchrun's process group if there is one);
    rank 0 writes every artifact. Returns the result (identical on every rank)."""
    local_rank, n_proc = local_rank_from_env()
    device = rank_device(cfg.device, local_rank, visible_gpus(), n_proc)  # checked before nccl picks a GPU
    created = init_from_env(cfg.device)  # True: this call joined torchrun's group and leaves it below
    rank, world = rank_world()
    set_threads(cfg.threads)
    splits = load_splits(run)
    clean, mean_ex = select_examples(splits, cfg)
    lm = run.load_model(device=device, dtype=cfg.dtype)
    batch_size, heads_per_pass, plan = _memory_plan(lm, cfg, clean)
    show = cfg.progress and is_main()
    t0 = time.perf_counter()
    abar = mean_contributions(lm, [e.triggered for e in mean_ex], batch_size=cfg.mean_batch_size, progress=show)
    abar_s = time.perf_counter() - t0
    res = attribute(lm, [e.prompt for e in clean], [e.backdoor_output for e in clean], abar, method=cfg.method,
                    metric=cfg.metric, batch_size=batch_size, metrics=cfg.metrics, strategy=cfg.strategy,
                    heads_per_pass=heads_per_pass, progress=show, refine_top=cfg.refine_top,
                    checkpoint=run.path / "attribution" / ".partial_exact.safetensors")
    res.info.update(world_size=world, threads=torch.get_num_threads(), abar_seconds=round(abar_s, 3))
    if plan:
        res.info["memory_plan"] = plan
    if is_main():
        write_outputs(run, res, abar, cfg, [e.uid for e in clean], [e.uid for e in mean_ex])
    barrier()
    if created:
        shutdown()
    return res


def _memory_plan(lm, cfg: AttributeConfig, clean: list) -> tuple[int, int | None, dict | None]:
    """On one CUDA device, the exact sweep's ``batch_size`` / ``heads_per_pass`` from the free GPU memory when
    ``heads_per_pass`` is unset (:func:`~bkdattr.attribution.exact_memory.plan_exact`); elsewhere the configured
    values."""
    split = len(set((getattr(lm.model, "hf_device_map", None) or {"": 0}).values())) > 1
    if cfg.method != "exact" or lm.device.type != "cuda" or split or not clean:
        return cfg.batch_size, cfg.heads_per_pass, None

    free, _total = torch.cuda.mem_get_info(lm.device)
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters() if p.device == lm.device)
    return plan_exact(lm, [e.prompt for e in clean], [e.backdoor_output for e in clean], cfg.batch_size,
                      cfg.heads_per_pass, free + weights)


def concentration(acie: torch.Tensor, share: float = 0.05) -> float | None:
    """Share of the total positive ACIE held by the top ``share`` of heads (sparsity of the effect)."""
    v = acie[~torch.isnan(acie)].clamp(min=0).flatten()
    if v.numel() == 0 or float(v.sum()) <= 0:
        return None
    k = max(1, round(share * v.numel()))
    return float(v.topk(k).values.sum() / v.sum())


def write_outputs(run: RunDir, res: AttributionResult, abar: torch.Tensor, cfg: AttributeConfig,
                  prompt_uids: list[str], mean_uids: list[str]) -> dict[str, Any]:
    """Save tensors, JSON, heatmap and the ``attribution`` metrics section; return that section."""
    folder = run.path / "attribution"
    res.save(folder)
    save_tensors(folder / "abar.safetensors", {"abar": abar.float()},
                 metadata={"n_prompts": str(len(mean_uids)), "prompts": "triggered training prompts"})
    summary = res.to_json(cfg.top_k)
    write_json(folder / "attribution.json", {**summary, "config": cfg.to_dict(), "prompt_uids": prompt_uids,
                                             "mean_prompt_uids": mean_uids})
    plot_acie(res, run.figures_dir / FIGURE_NAME, top_k=min(cfg.top_k, 8))
    computed = [m for m in METRICS if m in summary["top_heads_by_metric"]]
    section = {
        "method": res.method, "metric": res.metric, "top_heads": summary["top_heads"], "seconds": summary["seconds"],
        "n_prompts": res.n_prompts, "n_mean_prompts": len(mean_uids), "prompt_split": cfg.prompt_split,
        "metrics_computed": computed, "top_heads_by_metric": summary["top_heads_by_metric"],
        "clean_mean": summary["clean_mean"],
        "metric_coverage": res.info.get("metric_coverage", dict.fromkeys(computed, "all")),
        "refine_top": res.info.get("refine_top", 0), "refine_rank_agreement": res.info.get("refine_rank_agreement"),
        "top5pct_share_of_positive_acie": concentration(res.acie[res.metric]), "strategy": res.info.get("strategy"),
        "world_size": res.info.get("world_size", 1), "abar_seconds": res.info.get("abar_seconds"),
        "acie_file": "attribution/acie.safetensors", "abar_file": "attribution/abar.safetensors",
    }
    run.update_metrics("attribution", section)
    return section


def _stage_worker(run_path: str, options: dict[str, Any]) -> None:
    attribute_run(RunDir(run_path), AttributeConfig.from_options({**options, "workers": 1}))


def run_stage(run: RunDir, options: dict[str, Any]) -> dict[str, Any]:
    """Pipeline entry point: run the stage with ``options`` (see :class:`AttributeConfig`); returns the
    ``attribution`` metrics section."""
    cfg = AttributeConfig.from_options(options)
    if cfg.workers > 1 and not is_distributed():
        rank_device(cfg.device, cfg.workers - 1, visible_gpus(), cfg.workers)  # one GPU per worker, before spawning
        run_workers(cfg.workers, _stage_worker, (str(run.path), options), backend=backend_for(cfg.device),
                    threads=cfg.threads)
    else:
        attribute_run(run, cfg)
    return run.metrics().get("attribution", {})


def print_summary(run: RunDir, console=None, k: int = 16) -> None:
    """Print the top-k table of the saved result of ``run``."""
    res = AttributionResult.load(run.path / "attribution")
    (console or Console()).print(top_table(res, k))
