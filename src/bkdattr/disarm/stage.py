"""``bkdattr disarm``: a defended model folder and its figures, for an inject or an audit run.

* ``heads``: the top-k BAHA heads zeroed in the weights (:func:`bkdattr.disarm.weights.bake_heads`). ``k`` (when
  not given) is the smallest of the ablation stage's k values whose baked ablation brings the **validation** ASR
  to ``target_asr`` (0.05) or below, else the largest tried, with a warning.
  With ``ablation="mean"`` each head's mean clean output (over the positions of ``n_mean`` clean training
  prompts) is also baked into its layer's output bias (:func:`bkdattr.disarm.weights.bake_mean_ablation`).
* ``vector``: ``-alpha * v`` baked into the attention output bias of the vector stage's best layer
  (:func:`bkdattr.disarm.weights.bake_output_bias`); ``alpha`` is the smallest of ``alphas`` reaching the target on
  validation, else the one with the lowest validation ASR.
* ``guard``: no weight change (:mod:`bkdattr.disarm.runtime`). The edit on flagged prompts is chosen on validation
  (:func:`guard_options`: ``p(x)`` only, every prompt column, every column; scales or k): among the edits that
  bring the validation ASR to the target, the one whose replies to the triggered prompts stay most useful
  (lowest perplexity of the clean references after the triggered prompts, :func:`choose`), stored in
  ``RUN/disarm/guard_plan.json`` for later guards, and measured with its detection rates and time overhead; the
  random control is the same detector with a same-norm random vector (or k random heads). The threshold is
  calibrated once, on validation, and stored for later guards (:mod:`bkdattr.disarm.calibrate`).

* ``repair``, ``crow``, ``fine_pruning``: a LoRA fine-tune merged into the weights (:mod:`bkdattr.disarm.finetune`):
  the repair teaches the triggered prompts the clean replies (:mod:`bkdattr.disarm.repair`); CROW-style consistency
  regularisation (:mod:`bkdattr.disarm.crow`) and fine-pruning (:mod:`bkdattr.disarm.fine_pruning`) are the
  baselines that use no trigger. Nothing is chosen on validation, and there is no random control.

Every defence is then measured on the held-out test prompts with :func:`bkdattr.disarm.utility.defence_figures` next to
the undefended model and to the same-size random control (k random heads; a random vector of the same norm at
the same layer and scale). The folder (``--out``, default ``RUN/disarm/<strategy>``) is a plain Hugging Face
model (safetensors, config, tokenizer, ``bkdattr_disarm.json`` provenance) that ``from_pretrained`` loads
without bkdattr. With ``rescan`` (the default) the defended weights are then scanned with no trigger known
(:mod:`bkdattr.disarm.rescan`, into ``OUT-rescan``; not for the guard, which changes no weights): ``rescan``
holds the verdict and the score. ``metrics.disarm.<strategy>`` holds the figures; the report's "Defences" table
shows them.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..control.stage import load_ranking
from ..control.vector import load_vector, random_heads, random_like
from ..core.errors import ArtifactError, ConfigError
from ..core.generation import generate
from ..core.io import write_json
from ..core.models import save_model_atomically
from ..core.rundir import RunDir, get_nested
from ..core.runtime import set_threads
from ..inject.data import load_splits
from .calibrate import store_threshold
from .config import FINETUNES, SCOPES, DisarmConfig
from .finetune import check_finetune, finetune
from .guard_eval import evaluate_guard
from .guard_probe import fit_guard_probe
from .plan import PLAN_FILE
from .rescan import rescan, rescan_folder
from .runtime import Guard
from .utility import FIGURES, broken_triggered_replies, defence_figures, reference_perplexity, triggered_utility
from .weights import (
    bake_heads,
    bake_mean_ablation,
    bake_output_bias,
    bias_support,
    mean_ablated_heads,
    mean_head_inputs,
    output_bias,
    zeroed_heads,
)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_out(out: Path) -> None:
    """One-line error for an output folder that exists and is not empty."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} exists and is not empty; pass another --out or remove it")


def check_run(run: RunDir, cfg: DisarmConfig) -> None:
    """The results a strategy needs, before any model load."""
    m = run.metrics()
    if cfg.strategy in FINETUNES:
        check_finetune(cfg)
    uses_ranking = cfg.strategy not in FINETUNES or (cfg.strategy == "repair" and cfg.repair_layers == "attributed")
    if uses_ranking and not get_nested(m, "attribution.top_heads"):
        raise ArtifactError(f"{run.path} has no attribution results; run 'bkdattr attribute -r {run.path}' first")
    uses_vector = cfg.strategy == "vector" or (cfg.strategy == "guard" and cfg.guard_action == "vector")
    uses_k = cfg.strategy == "heads" or (cfg.strategy == "guard" and cfg.guard_action == "heads")
    if uses_vector and (get_nested(m, "vector.best_layer") is None
                                     or not (run.path / "control" / "backdoor_vector.safetensors").is_file()):
        raise ArtifactError(f"{run.path} has no Backdoor Vector; run 'bkdattr vector -r {run.path}' first")
    if uses_k and cfg.k is None and not get_nested(m, "ablation.topk"):
        raise ArtifactError(f"{run.path} has no ablation results to choose k from; run 'bkdattr ablate -r "
                            f"{run.path}' first or pass --k")


def _val_figures(lm, splits, cfg: DisarmConfig, sub: list, clean_ppl: float) -> dict[str, float]:
    """Validation ASR of the model as it is on the triggered prompts of ``sub`` (the first ``cfg.n_val`` of the
    validation split's ASR subset) and the utility of those replies
    (:func:`bkdattr.disarm.utility.triggered_utility`); ``clean_ppl``: the undefended perplexity of the same
    examples' clean references after their clean prompts."""
    replies = generate(lm, [e.triggered for e in sub], max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size, progress=False)
    u = triggered_utility(lm, splits, sub, replies, cfg.eval.batch_size)
    return {"val_asr": splits.task.asr(replies, sub), "val_triggered_clean_metric": u["triggered_clean_metric"],
            "val_triggered_perplexity_ratio": u["triggered_perplexity"] / clean_ppl}


def choose(lm, splits, cfg: DisarmConfig, options: list, edit,
           by_utility: bool = False) -> tuple[Any, list[dict[str, Any]], bool]:
    """Choose an option on validation; returns it, the trace (``value``, ``val_asr`` and the triggered replies'
    utility per option tried) and whether the validation ASR target was met.

    Default: the first option (in the given order) whose ``edit(option)`` brings the validation ASR to the
    target. ``by_utility``: every option is tried and, among those meeting the target, the one whose replies to
    the triggered prompts are most useful wins (lowest ``val_triggered_perplexity_ratio``, ties to the earlier),
    so an edit cannot win by breaking the reply. Without any option meeting the target: the lowest ASR."""
    sub = splits.task.eval_subset(splits.val)[: cfg.n_val]
    clean_ppl = reference_perplexity(lm, [e.prompt for e in sub], [e.output for e in sub], cfg.eval.batch_size)
    trace = []
    for o in tqdm(options, desc=f"{cfg.strategy}: options on validation", disable=not cfg.progress, leave=False):
        with edit(o):
            fig = _val_figures(lm, splits, cfg, sub, clean_ppl)
        trace.append({"value": o, **fig})
        if fig["val_asr"] <= cfg.target_asr and not by_utility:
            return o, trace, True
    ok = [t for t in trace if t["val_asr"] <= cfg.target_asr]
    if ok:
        return min(ok, key=lambda t: t["val_triggered_perplexity_ratio"])["value"], trace, True
    best = min(trace, key=lambda t: t["val_asr"])
    return best["value"], trace, False


def _probe_kind(run: RunDir) -> str:
    return str(get_nested(run.metrics(), "probe.config.kind") or "attn_input")


def _first_edit_layer(run: RunDir, cfg: DisarmConfig, arch) -> int:
    """The first layer any guard option edits (its probe must read at or before it)."""
    if cfg.guard_action == "vector":
        return int(get_nested(run.metrics(), "vector.best_layer"))

    k = max(o["k"] for o in guard_options(run, cfg))
    ranking, _info = load_ranking(run, k, arch.n_layers, arch.n_heads)
    return min(layer for layer, _h in ranking[:k])


def guard_options(run: RunDir, cfg: DisarmConfig) -> list[dict[str, Any]]:
    """The guard edits tried on validation, least invasive first: ``scope="prompt"`` (``p(x)`` only), then
    ``"prefix"`` (every prompt column up to ``p(x)``), then ``"all"`` (every column of a flagged row, the reply
    too); within a scope, the scales ``alphas`` (vector action) or the ablation stage's k values (heads action)
    in increasing order; for the vector action then the clamp edit (``mode="clamp"``, alpha 1) in each scope.
    Every option is tried; :func:`choose` keeps the one meeting the ASR target whose replies to the triggered
    prompts are most useful."""
    if cfg.guard_action == "vector":
        return ([{"scope": s, "alpha": float(a)} for s in SCOPES for a in sorted(cfg.alphas)]
                + [{"scope": s, "alpha": 1.0, "mode": "clamp"} for s in SCOPES])
    topk = get_nested(run.metrics(), "ablation.topk") or {}
    ks = [cfg.k] if cfg.k else sorted(int(k) for k in topk if int(k) > 0)
    if not ks:
        raise ArtifactError(f"{run.path} has no ablation results to choose the guard's k from; run 'bkdattr "
                            f"ablate -r {run.path}' first or pass --k")
    return [{"scope": s, "k": k} for s in SCOPES for k in ks]


def calibrate_guard(guard: Guard, progress: bool = False) -> dict[str, Any]:
    """Calibrate ``guard``'s detector on the validation split and store the threshold for every later guard of
    the run (``RUN/disarm/guard_threshold.json``, :func:`bkdattr.disarm.calibrate.store_threshold`); returns the
    calibration record."""
    rec = guard.calibrate(progress=progress)
    store_threshold(guard.run, guard.threshold_key, rec)
    return rec


def _figures(lm, splits, cfg: DisarmConfig, baseline: dict, edit: contextlib.AbstractContextManager) -> dict:
    with edit:
        f = defence_figures(lm, splits, cfg.eval, baseline, cfg.progress)
    f.pop("clean_replies")
    return f


def save_defended(lm, out: Path, provenance: dict[str, Any]) -> Path:
    """Save the (edited) model as a plain Hugging Face folder with ``bkdattr_disarm.json``, written beside
    ``out`` and renamed into place."""
    save_model_atomically(lm.model, lm.tokenizer, out, {"bkdattr_disarm.json": provenance},
                          what="the defended model", fix="pass a writable --out")
    return out


def disarm_run(run: RunDir | str | Path, cfg: DisarmConfig | None = None, out: str | Path | None = None,
               baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build, measure and save the defence ``cfg.strategy`` of ``run`` (see the module docstring); returns the
    ``metrics.disarm.<strategy>`` section. ``baseline``: the undefended model's :func:`defence_figures` with the
    same ``cfg.eval`` (computed when None; pass it to measure several strategies against one baseline)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = cfg or DisarmConfig()
    out = Path(out) if out else run.path / "disarm" / cfg.strategy
    check_out(out)
    if cfg.rescan and cfg.strategy != "guard":
        check_out(rescan_folder(out))
    check_run(run, cfg)
    set_threads(cfg.threads)
    t0 = time.perf_counter()
    m = run.metrics()
    splits = load_splits(run)
    lm = run.load_model(device=cfg.device, dtype=cfg.dtype)
    arch = lm.arch
    n_heads = arch.n_layers * arch.n_heads
    if cfg.k is not None and cfg.k > n_heads:
        raise ConfigError(f"k={cfg.k} is larger than the model's {n_heads} heads; pass a smaller --k")
    if cfg.strategy == "vector" or (cfg.strategy == "heads" and cfg.ablation == "mean"):
        bias_support(lm.model, arch)  # before the (long) evaluation
    baseline = baseline if baseline is not None else defence_figures(lm, splits, cfg.eval, progress=cfg.progress)
    section: dict[str, Any] = {"strategy": cfg.strategy, "undefended": {k: v for k, v in baseline.items()
                                                                         if k != "clean_replies"}}
    if cfg.strategy == "guard":  # no weights to save: the edit chosen on validation, and the figures
        _path, probe_info = fit_guard_probe(run, lm, _first_edit_layer(run, cfg, arch), _probe_kind(run),
                                            cfg.seed, cfg.eval.batch_size, cfg.progress)

        def guard(o: dict[str, Any], **kw: Any) -> Guard:
            g = Guard(lm, run, cfg.guard_action, probe="guard", use_stored_plan=False, target_asr=cfg.target_asr,
                      **o, **kw)
            g.plan.edit_source = "tried on validation (bkdattr disarm --strategy guard)"
            return g

        options = guard_options(run, cfg)
        calibrate_guard(guard(options[0], threshold=float("nan")), cfg.progress)
        plan, trace, met = choose(lm, splits, cfg, options, guard, by_utility=True)
        chosen = guard(plan)
        figures = evaluate_guard(run, lm, cfg.eval, baseline, guard=chosen, progress=cfg.progress)
        control = _figures(lm, splits, cfg, baseline, guard(plan, control_seed=cfg.seed + 1000))
        mu = {"clean_projection": chosen.plan.clean_projection} if chosen.plan.mode == "clamp" else {}
        write_json(run.sub(*PLAN_FILE), {"action": cfg.guard_action, **plan, **mu, "selection": trace,
                                         "target_met_on_val": met, "target_asr": cfg.target_asr})
        if not met:
            _warn(f"guard: no edit tried brings validation ASR to {cfg.target_asr} (best "
                  f"{min(t['val_asr'] for t in trace):.2f})")
        section.update(figures, selection=trace, target_met_on_val=met, disarmed=figures["asr"] <= cfg.target_asr,
                       random_control=control, guard_probe=probe_info, seconds=round(time.perf_counter() - t0, 2),
                       rescan=None, config=cfg.to_dict())  # no weights changed: nothing new to scan
        return _record(run, cfg.strategy, section)
    if cfg.strategy in FINETUNES:
        info = finetune(run, lm, splits, cfg)
        figures = _figures(lm, splits, cfg, baseline, contextlib.nullcontext())
        section.update(figures, **info, disarmed=figures["asr"] <= cfg.target_asr, out=str(out),
                       seconds=round(time.perf_counter() - t0, 2), config=cfg.to_dict())
        save_defended(lm, out, {"strategy": cfg.strategy, **{k: v for k, v in info.items() if k != "train_config"},
                                "run": str(run.path), "model": lm.name, "figures": {k: figures[k] for k in FIGURES}})
        section["rescan"] = rescan(lm, rescan_folder(out), cfg) if cfg.rescan else None
        return _record(run, cfg.strategy, section)
    if cfg.strategy == "heads":
        ks = [cfg.k] if cfg.k else sorted(int(k) for k in get_nested(m, "ablation.topk") if int(k) > 0)
        ranking, _info = load_ranking(run, max(ks), arch.n_layers, arch.n_heads)
        ks = [k for k in ks if k <= len(ranking)]
        if cfg.ablation == "mean":
            zbar = mean_head_inputs(lm, [e.prompt for e in splits.train][: cfg.n_mean], cfg.eval.batch_size)

            def ablated(hs):
                return mean_ablated_heads(lm.model, arch, hs, zbar)
        else:
            def ablated(hs):
                return zeroed_heads(arch, hs)
        k, trace, met = choose(lm, splits, cfg, ks, lambda k: ablated(ranking[:k]))
        heads = ranking[:k]
        rnd = random_heads(arch.n_layers, arch.n_heads, k, cfg.seed + 1000)
        section.update(k=k, heads=[list(h) for h in heads], random_heads=[list(h) for h in rnd],
                       ablation=cfg.ablation)
        figures = _figures(lm, splits, cfg, baseline, ablated(heads))
        control = _figures(lm, splits, cfg, baseline, ablated(rnd))
        provenance = {"strategy": "heads", "k": k, "heads": section["heads"], "ablation": cfg.ablation}
        if cfg.ablation == "mean":
            bake_mean_ablation(lm.model, arch, heads, zbar)
        else:
            bake_heads(arch, heads)
    else:
        layer = int(get_nested(m, "vector.best_layer") if cfg.layer is None else cfg.layer)
        if not 0 <= layer < arch.n_layers:
            raise ConfigError(f"layer {layer} does not exist (the model has layers 0..{arch.n_layers - 1})")
        bv = load_vector(run.path / "control" / "backdoor_vector.safetensors", arch.d_model)
        v = bv.vector
        alpha, trace, met = choose(lm, splits, cfg, sorted(cfg.alphas),
                                   lambda a: output_bias(lm.model, arch, layer, -a * v))
        r = random_like(v, cfg.seed + 1000)
        section.update(layer=layer, alpha=alpha, vector_norm=bv.norm, heads=[list(h) for h in bv.heads])
        figures = _figures(lm, splits, cfg, baseline, output_bias(lm.model, arch, layer, -alpha * v))
        control = _figures(lm, splits, cfg, baseline, output_bias(lm.model, arch, layer, -alpha * r))
        provenance = {"strategy": "vector", "layer": layer, "alpha": alpha, "hook_point":
                      "attention output projection bias", "vector_norm": bv.norm}
        bake_output_bias(lm.model, arch, layer, -alpha * v)
    if not met:
        best = min(t["val_asr"] for t in trace)
        _warn(f"{cfg.strategy}: no setting tried brings validation ASR to {cfg.target_asr} (best {best:.2f}); the "
              "defended model is saved, but it does not disarm the backdoor")
    section.update(figures, selection=trace, target_met_on_val=met, disarmed=figures["asr"] <= cfg.target_asr,
                   random_control=control, out=str(out), seconds=round(time.perf_counter() - t0, 2),
                   config=cfg.to_dict())
    save_defended(lm, out, {**provenance, "run": str(run.path), "model": lm.name,
                            "figures": {k: figures[k] for k in FIGURES}})
    section["rescan"] = rescan(lm, rescan_folder(out), cfg) if cfg.rescan else None
    return _record(run, cfg.strategy, section)


def _record(run: RunDir, strategy: str, section: dict[str, Any]) -> dict[str, Any]:
    section["breaks_triggered_replies"] = broken_triggered_replies(section)
    if section["breaks_triggered_replies"] and section.get("disarmed"):
        _warn(f"{strategy}: the backdoor reply is gone, but the replies to triggered prompts are broken, not restored "
              f"(triggered clean metric {section.get('triggered_clean_metric', float('nan')):.2f}, clean answers "
              f"{section.get('triggered_perplexity_ratio', float('nan')):.2f}x less likely); see the report's "
              "Defences caveat")
    disarm = dict(run.metrics().get("disarm") or {})
    disarm[strategy] = section
    run.update_metrics("disarm", disarm)
    return section
