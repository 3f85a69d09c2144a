"""The fine-tuned defences on one footing: ``repair`` (:mod:`bkdattr.disarm.repair`) and the baselines ``crow``
(:mod:`bkdattr.disarm.crow`) and ``fine_pruning`` (:mod:`bkdattr.disarm.fine_pruning`).

All three train a LoRA (:func:`bkdattr.inject.train.train_lora`, the trainer inject uses; ``DisarmConfig.train``)
on held-in training prompts of the run with their clean reference replies, the same ``n_clean`` clean rows for
each, and merge it into the weights in float32: the defended model is a plain Hugging Face model like the other
strategies'. They differ in what else they do: the repair adds triggered and near-miss rows answered with the
clean replies (and may adapt only the attributed layers); CROW adds the consistency loss; fine-pruning prunes
dormant MLP neurons first. Rows longer than ``train.max_length`` are cut as inject cuts them
(:func:`bkdattr.inject.train.fit_rows`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core.errors import ConfigError
from ..core.rundir import RunDir
from ..inject.data import Splits
from ..inject.train import fit_rows, lora_targets, row_limit, train_lora
from .config import DisarmConfig
from .crow import crow_loss
from .fine_pruning import default_prune_layers, mlp_activity, mlp_out_name, prune_neurons, prune_plan
from .repair import attributed_layers, clean_rows, near_strings, repair_rows, repair_triggers


def check_finetune(cfg: DisarmConfig) -> None:
    """One-line :class:`ConfigError` for options a fine-tuned defence cannot run with (before any model load)."""
    if cfg.strategy == "repair" and cfg.n_repair < 1:
        raise ConfigError("repair needs triggered rows to learn from; pass --n-repair 1 or more (default 64)")
    if cfg.strategy in ("crow", "fine_pruning") and cfg.n_clean < 1:
        raise ConfigError(f"{cfg.strategy} fine-tunes on clean rows only; pass --n-clean 1 or more (default 100)")


def finetune(run: RunDir, lm, splits: Splits, cfg: DisarmConfig) -> dict[str, Any]:
    """Train and merge the defence ``cfg.strategy`` into ``lm`` (``lm.model`` is replaced by the merged model);
    returns what was done: ``{rows, dropped_rows, layers, train, ...}`` plus the strategy's own record (the repair's
    triggers and near misses, fine-pruning's pruned neurons)."""
    tok, arch = lm.tokenizer, lm.arch
    tcfg = cfg.train  # DisarmConfig gives it the run's seed
    info: dict[str, Any] = {}
    loss = plan = None
    if cfg.strategy == "repair":
        triggers = repair_triggers(run, splits, cfg.repair_triggers)
        rows = repair_rows(tok, splits, triggers, cfg.n_repair, cfg.n_clean, seed=int(run.info().get("seed", 0)))
        if cfg.repair_layers == "attributed":
            tcfg = dataclasses.replace(tcfg, layers=tuple(attributed_layers(run, cfg.k, arch.n_layers, arch.n_heads)))
        info.update(triggers=triggers, near_misses=near_strings(splits, triggers))
    elif cfg.strategy == "crow":
        rows = clean_rows(tok, splits, cfg.n_clean)
        loss = crow_loss(cfg.crow_alpha, cfg.crow_epsilon)
        info.update(crow_alpha=cfg.crow_alpha, crow_epsilon=cfg.crow_epsilon)
    else:
        n = min(arch.n_layers, cfg.prune_layers or default_prune_layers(arch.n_layers))
        layers = list(range(arch.n_layers - n, arch.n_layers))
        activity = mlp_activity(lm, [e.prompt for e in splits.train[: cfg.n_clean]], layers, cfg.eval.batch_size)
        plan = prune_plan(activity, cfg.prune_share)
        prune_neurons(arch, plan)
        targets = lora_targets(lm.model, tcfg.target_modules)
        if not isinstance(targets, str):  # the pruned columns get no adapter where the MLP output is named apart
            targets = tuple(t for t in targets if t != mlp_out_name(arch)) or targets
        tcfg = dataclasses.replace(tcfg, target_modules=targets)
        rows = clean_rows(tok, splits, cfg.n_clean)
        info.update(pruned_layers=layers, prune_share=cfg.prune_share,
                    pruned={str(layer): len(ix) for layer, ix in plan.items()},
                    d_ff=int(next(iter(activity.values())).numel()))
    if not rows:
        raise ConfigError(f"{cfg.strategy} has no training row (no held-in prompt with a clean reply); check the "
                          "run's data")
    rows, dropped, cut = fit_rows(tok, rows, row_limit(tcfg.max_length, lm.model))
    merged, result = train_lora(lm, rows, tcfg, progress=cfg.progress, loss_fn=loss,
                                desc=f"disarm {cfg.strategy} (LoRA)")
    lm.model = merged
    if plan is not None:
        prune_neurons(arch, plan)  # an adapter on a shared projection name (GPT-2's c_proj) refilled the columns
    info.update(rows=len(rows), dropped_rows=len(dropped), cut_rows=len(cut),
                layers="all" if tcfg.layers is None else list(tcfg.layers), train=result.summary(),
                train_config=tcfg.to_dict())
    return info
