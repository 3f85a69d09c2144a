"""The ``ablate`` and ``vector`` stages on a run folder.

Inputs: the merged backdoored model ``RUN/model``, the splits ``RUN/data``
(:func:`bkdattr.inject.data.load_splits`) and the head ranking of the attribute stage, read from
``metrics.json`` (``attribution.top_heads``: ``[layer, head, acie]`` best first). When a k needs more heads
than ``top_heads`` lists, the ranking is extended from ``RUN/attribution/acie.safetensors`` (tensor
``acie.<attribution.metric>``, ``[L, H]``); k values that still do not fit are skipped and listed.

Evaluation prompts are held out: a seeded sample of ``n_prompts`` examples of the split (the task's counted
examples only, e.g. Sports rows for label_flip), used in clean and triggered form.

Outputs: ``metrics.json`` sections ``ablation`` / ``vector``; ``RUN/control/ablation_replies.json`` and
``vector_replies.json`` (every reply per edit); ``RUN/control/backdoor_vector.safetensors`` (+ ``.json``
provenance); ``RUN/control/abar_poisoned.safetensors`` (cached means); figures ``ablation_asr_vs_k.png``,
``vector_asr_vs_layer.png``, ``vector_dose_response.png``.

Profiles (sizes per profile): :mod:`bkdattr.core.profiles`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..attribution.means import mean_contributions
from ..core.errors import ArtifactError, ConfigError, DataError
from ..core.io import load_tensors, read_json, save_tensors, stable_hash, tensor_metadata, write_json
from ..core.options import StageOptions, opt
from ..core.rundir import RunDir, get_nested
from ..core.runtime import set_threads
from ..inject.data import load_splits, sample_examples
from .ablation import DEFAULT_KS, k_values, run_ablation, share_k
from .figures import ABLATION_FIGURE, DOSE_FIGURE, LAYER_FIGURE, plot_ablation, plot_dose, plot_layers
from .sweep import SweepStats
from .vector import BackdoorVector, build_vector, random_heads, save_vector
from .vector_eval import SELECT_BY, residual_norms, run_vector_experiment


@dataclass
class _Options(StageOptions):
    """Options both control stages take (plus the run-wide ones of :class:`~bkdattr.core.options.StageOptions`);
    None sizes take the profile's value (:mod:`bkdattr.core.profiles`)."""

    max_new_tokens: int = opt(32, "greedy reply length")
    batch_size: int = opt(32, "prompts sharing a prefix pass")
    max_rows: int = opt(256, "rows decoded together")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_rows < 1:
            raise ConfigError("max_new_tokens, batch_size and max_rows must be >= 1")
        if self.n_prompts < 0:
            raise ConfigError("n_prompts must be >= 0 (0: every held-out example)")


@dataclass
class AblationConfig(_Options):
    """Options of the ablate stage."""

    stage = "ablate"
    ks: list[int] = opt(help="head counts (plus the k nearest head_share of all heads)",
                        factory=lambda: list(DEFAULT_KS))
    head_share: float = opt(0.03, "share of all heads whose nearest k is added to ks (0: off)")
    random_seeds: int = opt(3, "seeds of the random-head control on triggered prompts (>= 3 recommended)")
    clean_random_seeds: int | None = opt(None, "how many of those seeds also run on clean prompts")
    split: str = opt("test", "held-out split of the evaluation prompts")
    n_prompts: int | None = opt(None, "held-out examples (0: all)")
    clean: bool = opt(True, "measure the clean side effect")

    def __post_init__(self) -> None:
        from_profile = self.clean_random_seeds is None
        super().__post_init__()
        if from_profile:
            self.clean_random_seeds = min(self.random_seeds, self.clean_random_seeds)
        if self.random_seeds < 1 or not 0 <= self.clean_random_seeds <= self.random_seeds:
            raise ConfigError("random_seeds must be >= 1 and clean_random_seeds in 0..random_seeds")
        if not 0.0 <= self.head_share < 1.0:
            raise ConfigError(f"head_share {self.head_share} must be in [0, 1)")
        self.ks = [int(k) for k in self.ks]


@dataclass
class VectorConfig(_Options):
    """Options of the vector stage (``select_by``: see :mod:`.vector_eval`)."""

    stage = "vector"
    k: int | None = opt(None, "heads summed into v (None: the k nearest head_share of all heads)")
    head_share: float = opt(0.03, "share of all heads in v when k is None (8 of 270 on the embedded model)")
    alpha: float = opt(1.0, "scale of the added / subtracted vector")
    layers: list[int] | None = opt(None, "layers to sweep (None: every layer_stride-th from 0)")
    layer_stride: int | None = opt(None, "sweep every n-th layer")
    random_seeds: int | None = opt(None, "same-norm random vectors (control)")
    dose_alphas: list[float] | None = opt(None, "the dose-response grid of alpha")
    select_by: str = opt("specific", "best-layer rule: specific, subtract or add")
    means: str = opt("poisoned", "poisoned (mean contributions over the poisoned training prompts, triggered) or "
                     "attribution (reuse BAHA's RUN/attribution/abar.safetensors)")
    n_mean_prompts: int = opt(0, "poisoned training prompts for the means (0: all)")
    n_prompts: int | None = opt(None, "held-out examples per split, val and test (0: all)")
    random_heads_control: bool = opt(True, "also build a vector from k random heads (control)")
    mean_batch_size: int = opt(16, "prompts per forward pass of the mean contributions")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select_by not in SELECT_BY:
            raise ConfigError(f"unknown select_by '{self.select_by}'; use one of {', '.join(SELECT_BY)}")
        if self.means not in ("poisoned", "attribution"):
            raise ConfigError(f"unknown means '{self.means}'; use poisoned or attribution")
        if self.layer_stride < 1 or self.random_seeds < 1 or (self.k is not None and self.k < 1):
            raise ConfigError("layer_stride, random_seeds and k must be >= 1")
        if self.n_mean_prompts < 0:
            raise ConfigError("n_mean_prompts must be >= 0 (0: every poisoned training prompt)")


# ---- inputs ---------------------------------------------------------------------------------------------
def eval_examples(splits, split: str, n: int | None, seed: int) -> list:
    """Held-out examples of ``split`` (val | test) that enter the ASR, seeded sample of ``n``."""
    if split not in ("val", "test"):
        raise ConfigError(f"split '{split}' must be val or test (evaluation prompts are held out)")
    pool = splits.task.eval_subset(getattr(splits, split))
    if not pool:
        raise DataError(f"the {split} split has no evaluation examples; rerun inject with a larger held-out split")
    return sample_examples(pool, n, seed)


def load_ranking(run: RunDir, need: int, n_layers: int, n_heads: int) -> tuple[list[tuple[int, int]], dict]:
    """``([(layer, head), ...] best first, info)`` from ``attribution.top_heads``, extended from the saved ACIE
    matrix when ``need`` exceeds it (and it exists)."""
    m = run.metrics()
    top = get_nested(m, "attribution.top_heads")
    if not top:
        raise ArtifactError(f"{run.path}/metrics.json has no attribution.top_heads; run 'bkdattr attribute --run "
                            f"{run.path}' first")
    ranking = [(int(t[0]), int(t[1])) for t in top]
    bad = [h for h in ranking if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise ArtifactError(f"attribution.top_heads lists head {bad[0]} outside this model ({n_layers} layers x "
                            f"{n_heads} heads); rerun 'bkdattr attribute' on this run")
    metric = get_nested(m, "attribution.metric")
    info: dict[str, Any] = {"source": "metrics.json attribution.top_heads", "metric": metric,
                            "method": get_nested(m, "attribution.method"), "n_listed": len(ranking)}
    path = run.path / "attribution" / "acie.safetensors"
    if need > len(ranking) and metric and path.is_file():
        t = load_tensors(path)
        acie = t.get(f"acie.{metric}")
        if acie is not None and tuple(acie.shape) == (n_layers, n_heads):
            flat = acie.float().flatten().nan_to_num(nan=float("-inf"))
            seen = set(ranking)
            for i in flat.argsort(descending=True).tolist():
                h = (i // n_heads, i % n_heads)
                if h not in seen and flat[i] > float("-inf"):
                    ranking.append(h)
                    seen.add(h)
            info["source"] += f" extended from attribution/acie.safetensors (acie.{metric})"
    info["n_ranked"] = len(ranking)
    return ranking, info


def _fingerprint(lm) -> float:
    p = next(lm.model.parameters())
    return round(float(p.detach().float().flatten()[:256].sum()), 5)


def poisoned_means(run: RunDir, lm, splits, cfg: VectorConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """``abar`` ``[L, H, d]`` for the vector and where it came from (computed once, cached in RUN/control)."""
    arch = lm.arch
    shape = (arch.n_layers, arch.n_heads, arch.d_model)
    if cfg.means == "attribution":
        p = run.path / "attribution" / "abar.safetensors"
        if not p.is_file():
            raise ArtifactError(f"{p} missing; run 'bkdattr attribute' first or use means=poisoned")
        return load_tensors(p, expect={"abar": shape})["abar"].float(), {
            "source": str(p.relative_to(run.path)), "prompts": "triggered training prompts (attribute stage)"}
    pool = list(splits.train_poisoned)
    if not pool:
        raise DataError("the run has no poisoned training prompts to build the Backdoor Vector from; "
                        "use means=attribution")
    ex = sample_examples(pool, cfg.n_mean_prompts, cfg.seed + 1)
    key = stable_hash({"uids": [e.uid for e in ex], "texts": [e.triggered for e in ex], "model": _fingerprint(lm),
                       "dtype": str(lm.dtype), "v": 2})
    path = run.path / "control" / "abar_poisoned.safetensors"
    info = {"source": "poisoned training prompts (triggered)", "n_prompts": len(ex), "key": key,
            "cache": str(path.relative_to(run.path))}
    att_json, att_abar = run.path / "attribution" / "attribution.json", run.path / "attribution" / "abar.safetensors"
    if att_json.is_file() and att_abar.is_file():  # BAHA averaged over exactly these prompts: reuse its means
        uids = read_json(att_json).get("mean_prompt_uids")
        if isinstance(uids, list) and sorted(uids) == sorted(e.uid for e in ex):
            return load_tensors(att_abar, expect={"abar": shape})["abar"].float(), {
                **info, "cache": str(att_abar.relative_to(run.path)), "cached": True}
    if path.is_file() and tensor_metadata(path).get("key") == key:
        return load_tensors(path, expect={"abar": shape})["abar"].float(), {**info, "cached": True}
    abar = mean_contributions(lm, [e.triggered for e in ex], cfg.mean_batch_size, cfg.progress)
    save_tensors(path, {"abar": abar}, metadata={"key": key, "n_prompts": str(len(ex))})
    return abar, {**info, "cached": False}


def _load_lm(run: RunDir, cfg):
    set_threads(cfg.threads)
    return run.load_model(device=cfg.device, dtype=cfg.dtype)


# ---- stages ---------------------------------------------------------------------------------------------
def ablate_run(run: RunDir, cfg: AblationConfig, lm=None) -> dict[str, Any]:
    """Run the ablation experiment on ``run``; write replies, metrics section ``ablation`` and the figure."""
    t0 = time.perf_counter()
    splits = load_splits(run)
    lm = lm if lm is not None else _load_lm(run, cfg)
    arch = lm.arch
    ranking, rinfo = load_ranking(run, max(cfg.ks + [share_k(arch.n_total_heads, cfg.head_share)]),
                                  arch.n_layers, arch.n_heads)
    ks, skipped = k_values(arch.n_total_heads, cfg.ks, cfg.head_share or None, n_ranked=len(ranking))
    ex = eval_examples(splits, cfg.split, cfg.n_prompts, cfg.seed)
    seeds = [cfg.seed + i for i in range(cfg.random_seeds)]
    stats = SweepStats()
    res = run_ablation(lm, splits.task, ex, ex if cfg.clean else None, ranking, ks, seeds,
                       seeds[: cfg.clean_random_seeds], cfg.max_new_tokens, cfg.batch_size, cfg.max_rows,
                       cfg.progress, stats)
    m = res.metrics
    m.update(ks_skipped=skipped, k_share=share_k(arch.n_total_heads, cfg.head_share), n_heads_total=arch.n_total_heads,
             ranking=rinfo, split=cfg.split, seconds=round(time.perf_counter() - t0, 2), config=cfg.to_dict())
    write_json(run.sub("control", "ablation_replies.json"),
               {"uids": [e.uid for e in ex], "prompts": {"clean": [e.prompt for e in ex],
                                                         "triggered": [e.triggered for e in ex]},
                "replies": res.replies})
    plot_ablation(m, run.figures_dir / ABLATION_FIGURE)
    m["figure"] = f"figures/{ABLATION_FIGURE}"
    run.update_metrics("ablation", m)
    return m


def vector_run(run: RunDir, cfg: VectorConfig, lm=None) -> dict[str, Any]:
    """Build, save and evaluate the Backdoor Vector on ``run``; write metrics section ``vector`` and figures."""
    t0 = time.perf_counter()
    splits = load_splits(run)
    lm = lm if lm is not None else _load_lm(run, cfg)
    arch = lm.arch
    k = cfg.k or share_k(arch.n_total_heads, cfg.head_share)
    if k > arch.n_total_heads:
        raise ConfigError(f"k={k} is more than the model's {arch.n_total_heads} heads ({arch.n_layers} layers x "
                          f"{arch.n_heads}); pass --k {arch.n_total_heads} or less")
    layers = list(cfg.layers) if cfg.layers is not None else list(range(0, arch.n_layers, cfg.layer_stride))
    bad = [x for x in layers if not 0 <= int(x) < arch.n_layers]
    if bad:  # checked before any work is done
        raise ConfigError(f"layer {bad[0]} does not exist (the model has layers 0..{arch.n_layers - 1})")
    ranking, rinfo = load_ranking(run, k, arch.n_layers, arch.n_heads)
    if k > len(ranking):
        raise ArtifactError(f"k={k} heads asked for but the ranking lists {len(ranking)}; lower k or rerun "
                            "'bkdattr attribute' with a larger top_k")
    heads = ranking[:k]
    t_means = time.perf_counter()
    abar, minfo = poisoned_means(run, lm, splits, cfg)
    t_means = time.perf_counter() - t_means
    v = build_vector(abar, heads)
    rh = random_heads(arch.n_layers, arch.n_heads, k, cfg.seed + 1000) if cfg.random_heads_control else None
    v_rh = build_vector(abar, rh) if rh else None
    prov = {"model": lm.name, "run": str(run.path), "k": k, "ranking": rinfo, "means": minfo,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    bv = BackdoorVector(v, heads, prov)
    save_vector(run.sub("control", "backdoor_vector.safetensors"), bv)

    val = eval_examples(splits, "val", cfg.n_prompts, cfg.seed)
    test = eval_examples(splits, "test", cfg.n_prompts, cfg.seed)
    t_norm = time.perf_counter()
    norms = residual_norms(lm, [e.prompt for e in val[:16]])
    t_norm = time.perf_counter() - t_norm
    seeds = [cfg.seed + i for i in range(cfg.random_seeds)]
    stats = SweepStats()
    res = run_vector_experiment(lm, splits.task, val, test, v, [int(x) for x in layers], cfg.alpha, seeds, v_rh,
                                cfg.dose_alphas, cfg.select_by, cfg.max_new_tokens, cfg.batch_size, cfg.max_rows,
                                cfg.progress, stats)
    m = res.metrics
    best = m["best_layer"]
    m["norms"] = {"vector": bv.norm, "random_heads_vector": float(v_rh.norm()) if v_rh is not None else None,
                  "residual_at_best_layer": norms["residual"][best],
                  "attention_output_at_best_layer": norms["attention_output"][best],
                  "residual_per_layer": norms["residual"], "attention_output_per_layer": norms["attention_output"],
                  "measured_on": f"{min(16, len(val))} clean val prompts, at p(x)"}
    m.update(k=k, heads=[list(h) for h in heads], random_heads=[list(h) for h in rh] if rh else None,
             means=minfo, ranking=rinfo, vector_file="control/backdoor_vector.safetensors",
             timing={"means_s": round(t_means, 2), "norms_s": round(t_norm, 2), "sweep_s": round(stats.seconds, 2)},
             seconds=round(time.perf_counter() - t0, 2), config=cfg.to_dict())
    write_json(run.sub("control", "vector_replies.json"),
               {"val_uids": [e.uid for e in val], "test_uids": [e.uid for e in test], "replies": res.replies})
    plot_layers(m, run.figures_dir / LAYER_FIGURE)
    plot_dose(m, run.figures_dir / DOSE_FIGURE)
    m["figures"] = [f"figures/{LAYER_FIGURE}", f"figures/{DOSE_FIGURE}"]
    run.update_metrics("vector", m)
    return m


def run_ablation_stage(run: RunDir, options: dict[str, Any]) -> dict[str, Any]:
    """Pipeline entry of the ablate stage (options: :class:`AblationConfig` fields + run-wide keys)."""
    return ablate_run(run, AblationConfig.from_options(options))


def run_vector_stage(run: RunDir, options: dict[str, Any]) -> dict[str, Any]:
    """Pipeline entry of the vector stage (options: :class:`VectorConfig` fields + run-wide keys)."""
    return vector_run(run, VectorConfig.from_options(options))

