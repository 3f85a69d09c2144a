"""The probe stage on a run folder: does the backdoored model carry a linearly/non-linearly readable trace of
the trigger at each layer, and is that trace a *backdoor* feature or just the trigger's text?

Protocol (docs/METHOD.md section 2, with the controls the paper lacked):

1. **Prompts.** ``n_prompts`` distinct prompts of the run (``prompt_source``: by default held-out ``val`` +
   ``test`` prompts first, topped up with training prompts when there are too few; the metrics record how
   many came from each split). Probing does not train the model, so training prompts are admissible, but
   held-out ones are preferred: the model never saw them.
2. **Split by prompt**, seeded, 60/20/20: a prompt's clean, triggered and near-trigger versions always land in
   the same split, so a probe is never tested on a variant of a prompt it was trained on.
3. **Features** of every layer at ``p(x)`` (:mod:`.features`, cached under ``RUN/probe/features/``; an audit
   run's under ``$BKDATTR_CACHE/features/``, so the run stays small).
4. **Four probe settings**, each with an MLP and an SVM per layer, accuracy/AUROC on the test split and both
   ICLA matrices:

   ==========================  ==================  ============================================
   setting                     model               negatives vs positives (triggered)
   ==========================  ==================  ============================================
   backdoored (main result)    backdoored          clean prompt
   control                     clean base model    clean prompt
   near_trigger                backdoored          the prompt with a near trigger (``2023``)
   near_trigger.control        clean base model    the prompt with a near trigger
   ==========================  ==================  ============================================

   If the control scores as high as the main result, the probe reads the trigger's *text*, which any model
   encodes. The near-trigger settings ask the sharper question: does the backdoored model separate the real
   trigger from a near miss better than the clean model does? The near strings are the task's
   ``near_triggers``, assigned to prompts in turn (seeded) and inserted exactly where the trigger goes (same
   per-prompt seed). The main probe's *fire rate* on near-trigger test prompts is reported too.

Artifacts: ``RUN/probe/{setting}_{mlp.safetensors,svm.npz}`` (probes; the near-trigger settings' only with
``save_near_trigger_probes``), ``RUN/probe/prompts.json`` (the prompts,
their split and near string), ``RUN/probe/features/*.safetensors`` (cache); metrics section ``probe``;
figures ``probe_icla_mlp.png``, ``probe_icla_svm.png``, ``probe_accuracy.png``.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.errors import ConfigError, DataError
from ..core.figures import new_figure, save_figure
from ..core.io import write_json
from ..core.models import cache_dir
from ..core.options import StageOptions, opt
from ..core.rundir import RunDir
from ..inject.data import load_splits, prompt_seed
from .features import cached_features, check_kind, model_fingerprint
from .icla import accuracy_from_scores, auroc, fire_rate, icla_matrix, transfer_summary
from .probes import MLPProbeConfig, MLPProbes, SVMProbeConfig, SVMProbes, train_mlp_probes, train_svm_probes

if TYPE_CHECKING:  # pragma: no cover
    from ..inject.data import Example, Splits

PROMPT_SOURCES = ("heldout_first", "heldout", "all", "train")
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class ProbeStageConfig(StageOptions):
    """Options of the probe stage (plus the run-wide ones of :class:`~bkdattr.core.options.StageOptions`;
    ``seed`` drives the prompt sample, the split and the MLP probes, replacing ``mlp.seed``)."""

    stage = "probe"
    n_prompts: int | None = opt(None, "prompts, each clean and triggered")
    kind: str = opt("attn_input", "feature: attn_input (normalised attention input) or residual")
    split: tuple[float, float, float] = opt((0.6, 0.2, 0.2), "train/val/test fractions of the prompts")
    prompt_source: str = opt("heldout_first", "heldout_first, heldout, all or train")
    control: bool = opt(True, "also probe the clean base model")
    near_trigger: bool = opt(True, "also probe trigger vs near-trigger prompts (when the task has near triggers)")
    save_near_trigger_probes: bool = opt(False, "also save the near-trigger settings' probe weights (their "
                                                "figures are always in metrics.probe; ~45 MB on the embedded model)")
    batch_size: int = opt(16, "prompts per forward pass during feature capture")
    mlp: MLPProbeConfig = opt(help="MLP probe hyper-parameters", factory=MLPProbeConfig)
    svm: SVMProbeConfig = opt(help="SVM probe hyper-parameters", factory=SVMProbeConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kind(self.kind)
        self.split = tuple(float(x) for x in self.split)  # type: ignore[assignment]
        if len(self.split) != 3 or min(self.split) <= 0 or abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError(f"probe split {self.split} must be three positive fractions summing to 1")
        if self.prompt_source not in PROMPT_SOURCES:
            raise ConfigError(f"unknown prompt_source '{self.prompt_source}'; use one of {', '.join(PROMPT_SOURCES)}")
        if self.n_prompts < 10:
            raise ConfigError(f"n_prompts={self.n_prompts} is too few to split 60/20/20; use at least 10")


# ---------------------------------------------------------------------------------------------------------
# data


def select_examples(splits: Splits, n: int, source: str = "heldout_first", seed: int = 0
) -> tuple[list[Example], dict[str, int]]:
    """``n`` examples with distinct prompts from a run's splits, seeded; returns ``(examples, count per split)``.

    ``heldout_first``: val+test first, then train; ``heldout``: val+test only; ``train``: train only; ``all``:
    every split pooled and shuffled together."""
    pools = {"train": list(splits.train), "val": list(splits.val), "test": list(splits.test)}
    rng = random.Random(seed)
    for name in pools:
        rng.shuffle(pools[name])
    train = [("train", e) for e in pools["train"]]
    if source == "train":
        ordered = train
    else:
        ordered = ([] if source.startswith("heldout") else train) + [(k, e) for k in ("val", "test") for e in pools[k]]
        rng.shuffle(ordered)
        ordered += train if source == "heldout_first" else []
    seen: set[str] = set()
    out, counts = [], {"train": 0, "val": 0, "test": 0}
    for name, e in ordered:
        key = " ".join(e.prompt.split()).lower()
        if key in seen:
            continue
        seen.add(key)
        out.append(e)
        counts[name] += 1
        if len(out) == n:
            break
    if len(out) < n:
        raise DataError(f"only {len(out)} distinct prompts available from '{source}' but n_prompts={n}; "
                        "lower --n-prompts or use --prompt-source all")
    return out, counts


def split_by_prompt(n: int, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> np.ndarray:
    """Seeded assignment of ``n`` prompts to train (0) / val (1) / test (2): ``[n]`` int64. Sizes are
    ``round(f_train * n)``, ``round(f_val * n)`` and the rest; each part gets at least one prompt."""
    n_train = max(1, round(fractions[0] * n))
    n_val = max(1, round(fractions[1] * n))
    if n_train + n_val >= n:
        raise DataError(f"{n} prompts cannot be split {tuple(fractions)} with a non-empty test part; use more")
    perm = np.random.default_rng(seed).permutation(n)
    part = np.empty(n, dtype=np.int64)
    part[perm[:n_train]] = 0
    part[perm[n_train:n_train + n_val]] = 1
    part[perm[n_train + n_val:]] = 2
    return part


@dataclass
class PairedFeatures:
    """Features of each prompt as a negative (clean or near-trigger) and as a positive (triggered):
    ``neg``/``pos`` ``[P, L, d]``; ``part`` ``[P]`` is the prompt's split (0 train, 1 val, 2 test)."""

    neg: torch.Tensor
    pos: torch.Tensor
    part: np.ndarray

    def rows(self, which: int) -> tuple[torch.Tensor, np.ndarray]:
        """Rows of one split: negatives then positives, ``X [2n, L, d]``, labels ``y [2n]`` (0 then 1)."""
        idx = torch.as_tensor(np.flatnonzero(self.part == which))
        x = torch.cat([self.neg[idx], self.pos[idx]], dim=0)
        y = np.concatenate([np.zeros(len(idx), np.int64), np.ones(len(idx), np.int64)])
        return x, y


# ---------------------------------------------------------------------------------------------------------
# fitting and evaluation


def _r(v: Any, nd: int = 6) -> Any:
    """Rounded nested lists for JSON; NaN (e.g. AUROC with one class) becomes None (JSON has no NaN)."""
    a = np.round(np.asarray(v, dtype=np.float64), nd)
    if a.ndim == 0:
        return None if np.isnan(a) else float(a)
    return [_r(x, nd) for x in a]


def evaluate_probes(probes: MLPProbes | SVMProbes, data: PairedFeatures) -> dict[str, Any]:
    """Test accuracy and AUROC per layer, validation accuracy per layer, the ICLA matrix and its summary."""
    x_test, y_test = data.rows(2)
    x_val, y_val = data.rows(1)
    s_test = probes.scores(x_test)  # [N, L]
    icla = icla_matrix(probes, x_test, y_test)
    out: dict[str, Any] = {
        "in_layer_accuracy": _r(accuracy_from_scores(s_test.T, y_test)),
        "auroc": _r([auroc(s_test[:, i], y_test) for i in range(s_test.shape[1])]),
        "val_accuracy": _r(accuracy_from_scores(probes.scores(x_val).T, y_val)),
        "icla": _r(icla),
        "icla_summary": {k: _r(v) for k, v in transfer_summary(icla).items()},
    }
    if isinstance(probes, MLPProbes):
        out["best_epoch"] = list(probes.best_epoch)
    else:
        out["n_support"] = probes.n_support
    return out


def fit_setting(data: PairedFeatures, mlp_cfg: MLPProbeConfig, svm_cfg: SVMProbeConfig, layer_ids: Sequence[int],
                timings: dict[str, float] | None = None, prefix: str = ""
) -> tuple[MLPProbes, SVMProbes, dict[str, Any]]:
    """Train both probe types on the train split (MLP early-stopped on val) and evaluate them on test."""
    timings = timings if timings is not None else {}
    x_tr, y_tr = data.rows(0)
    x_va, y_va = data.rows(1)
    t = time.perf_counter()
    mlp = train_mlp_probes(x_tr, y_tr, x_va, y_va, mlp_cfg, layer_ids)
    timings[f"{prefix}mlp_train"] = time.perf_counter() - t
    t = time.perf_counter()
    svm = train_svm_probes(x_tr, y_tr, svm_cfg, layer_ids)
    timings[f"{prefix}svm_train"] = time.perf_counter() - t
    t = time.perf_counter()
    res = {"mlp": evaluate_probes(mlp, data), "svm": evaluate_probes(svm, data)}
    timings[f"{prefix}evaluate"] = time.perf_counter() - t
    for probes, r in ((mlp, res["mlp"]), (svm, res["svm"])):
        probes.meta.update(val_accuracy=r["val_accuracy"])
    return mlp, svm, res


# ---------------------------------------------------------------------------------------------------------
# the stage


def _near_prompts(task: Any, examples: Sequence[Any], seed: int, run_seed: int) -> list[tuple[str, str]]:
    """``(near string, prompt with it)`` per example: near strings in turn (seeded order), placed where the
    trigger goes (the per-prompt seed the run used for the trigger)."""
    strings = list(task.near_triggers)
    order = list(range(len(examples)))
    random.Random(seed + 17).shuffle(order)
    out: list[tuple[str, str]] = [("", "")] * len(examples)
    for j, i in enumerate(order):
        s = strings[j % len(strings)]
        e = examples[i]
        out[i] = (s, task.with_trigger(s).insert_trigger(e.prompt, prompt_seed(run_seed, e.uid)))
    return out


def _global_features() -> Path:
    return cache_dir() / "features"


def _model_features(lm: Any, texts: list[str], cfg: ProbeStageConfig, cache_dir: Path, tag: str
) -> tuple[torch.Tensor, bool, str]:
    feats, _path, hit = cached_features(lm, texts, cache_dir, kind=cfg.kind, batch_size=cfg.batch_size, tag=tag,
                                        progress=cfg.progress)
    return feats, hit, model_fingerprint(lm.model)


def run_probe_stage(
    run: RunDir | str | Path, cfg: ProbeStageConfig | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the probe stage on a run folder (see the module docstring); returns the ``probe`` metrics section."""
    cfg = cfg or ProbeStageConfig()
    run = run if isinstance(run, RunDir) else RunDir(run)
    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    splits = load_splits(run)
    task = splits.task
    run_seed = int(splits.meta.get("seed", 0))
    examples, counts = select_examples(splits, cfg.n_prompts, cfg.prompt_source, cfg.seed)
    n = len(examples)
    part = split_by_prompt(n, cfg.split, cfg.seed)
    do_near = bool(cfg.near_trigger and task.near_triggers)
    near = _near_prompts(task, examples, cfg.seed, run_seed) if do_near else []
    clean = [e.prompt for e in examples]
    trig = [e.triggered for e in examples]
    if any(not task.contains_trigger(t) for t in trig):
        raise DataError("a triggered prompt of this run lacks the trigger; rerun 'bkdattr inject' for this run")
    texts = clean + trig + [t for _s, t in near]
    probe_dir = run.path / "probe"
    # an audit run holds no bulky artifacts: its feature cache lives under $BKDATTR_CACHE (same keys)
    cache_dir = probe_dir / "features" if not run.is_audit else _global_features()
    write_json(probe_dir / "prompts.json", [
        {"uid": e.uid, "split": SPLIT_NAMES[int(p)], "prompt": e.prompt, "triggered": e.triggered,
         **({"near_trigger": near[i][0], "near_prompt": near[i][1]} if do_near else {})}
        for i, (e, p) in enumerate(zip(examples, part, strict=True))])

    def split3(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return f[:n], f[n:2 * n], (f[2 * n:3 * n] if do_near else None)

    mlp_cfg = dataclasses.replace(cfg.mlp, seed=cfg.seed)
    feats: dict[str, tuple] = {}
    models: dict[str, dict[str, Any]] = {}
    control = cfg.control and run.has_clean_reference()  # an audit without a clean reference has none
    for which in ("backdoored", "base") if control else ("backdoored",):
        t = time.perf_counter()
        say(f"loading the {which} model")
        lm = run.load_model(cfg.device, cfg.dtype) if which == "backdoored" else run.load_base_model(cfg.device,
                                                                                                      cfg.dtype)
        f, hit, fp = _model_features(lm, texts, cfg, cache_dir, which)
        feats[which] = split3(f)
        models[which] = {"name": lm.name, "fingerprint": fp, "features_cached": hit}
        layer_ids = list(range(lm.arch.n_layers))
        del lm
        gc.collect()
        timings[f"features_{which}"] = time.perf_counter() - t
        say(f"features of the {which} model: {time.perf_counter() - t:.1f} s" + (" (cache)" if hit else ""))

    results: dict[str, dict[str, Any]] = {}
    probes: dict[str, tuple[MLPProbes, SVMProbes]] = {}
    plan = [("backdoored", "backdoored", 0), ("control", "base", 0), ("near_trigger", "backdoored", 2),
            ("near_trigger_control", "base", 2)]
    for setting, which, neg_slot in plan:
        if which not in feats or (neg_slot == 2 and not do_near):
            continue
        t = time.perf_counter()
        f_clean, f_trig, f_near = feats[which]
        data = PairedFeatures(f_clean if neg_slot == 0 else f_near, f_trig, part)
        mlp, svm, res = fit_setting(data, mlp_cfg, svm_cfg=cfg.svm, layer_ids=layer_ids, timings=timings,
                                    prefix=f"{setting}_")
        for p in (mlp, svm):
            p.meta.update(setting=setting, kind=cfg.kind, model=models[which]["name"],
                          model_fingerprint=models[which]["fingerprint"])
        if not setting.startswith("near_trigger") or cfg.save_near_trigger_probes:
            mlp.save(probe_dir / f"{setting}_mlp.safetensors")
            svm.save(probe_dir / f"{setting}_svm.npz")
        probes[setting] = (mlp, svm)
        results[setting] = res
        timings[f"probes_{setting}"] = time.perf_counter() - t
        say(f"probes [{setting}]: {time.perf_counter() - t:.1f} s")

    # the main (clean vs triggered) probes applied to near-trigger test prompts: how often do they fire?
    if do_near:
        test_idx = torch.as_tensor(np.flatnonzero(part == 2))
        for setting, which in (("backdoored", "near_trigger"), ("control", "near_trigger_control")):
            if setting not in probes:
                continue
            f_near = feats["backdoored" if setting == "backdoored" else "base"][2][test_idx]
            results[which]["main_probe_fire_rate"] = {
                p.kind_name: _r(fire_rate(p, f_near)) for p in probes[setting]}
            strings = np.asarray([near[int(i)][0] for i in test_idx])
            results[which]["main_probe_fire_rate_by_string"] = {
                str(st): {"n_test_prompts": int((strings == st).sum()),
                          "mlp": _r(fire_rate(probes[setting][0], f_near[torch.as_tensor(strings == st)]))}
                for st in sorted(set(strings.tolist()))}

    sizes = {name: int((part == i).sum()) for i, name in enumerate(SPLIT_NAMES)}
    metrics: dict[str, Any] = {
        "feature_kind": cfg.kind,
        "n_prompts": n,
        "n_layers": len(layer_ids),
        "prompt_source": cfg.prompt_source,
        "prompts_from": counts,
        "split_prompts": sizes,
        "split_rows": {k: 2 * v for k, v in sizes.items()},
        "seed": cfg.seed,
        "model": models["backdoored"]["name"],
        "features_cached": {k: v["features_cached"] for k, v in models.items()},
        **results["backdoored"],
    }
    if "control" in results:
        metrics["control"] = {"model": models["base"]["name"], **results["control"]}
    elif cfg.control:
        metrics["control_skipped"] = ("no clean reference model: the audit was given neither --adapter (whose base "
                                      "model is the reference) nor --base-model")
    if do_near:
        strings = sorted({s for s, _t in near})
        metrics["near_trigger"] = {"strings": strings, **results["near_trigger"]}
        if "near_trigger_control" in results:
            metrics["near_trigger"]["control"] = results["near_trigger_control"]
    else:
        metrics["near_trigger"] = {"skipped": "switched off" if task.near_triggers else
                                   "the task defines no near triggers"}
    metrics["summary"] = summarise(metrics)
    t = time.perf_counter()
    write_figures(run, metrics)
    timings["figures"] = time.perf_counter() - t
    metrics["timings"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    metrics["config"] = {**dataclasses.asdict(cfg), "mlp": dataclasses.asdict(mlp_cfg)}  # effective MLP seed
    run.update_metrics("probe", metrics)
    return metrics


def summarise(m: dict[str, Any]) -> dict[str, Any]:
    """Mean in-layer accuracies per setting and the best layer by validation accuracy (MLP)."""
    out: dict[str, Any] = {}
    sections = {"backdoored": m, "control": m.get("control"), "near_trigger": m.get("near_trigger"),
                "near_trigger_control": (m.get("near_trigger") or {}).get("control")}
    for name, sec in sections.items():
        if not sec or "mlp" not in sec:
            continue
        out[name] = {k: round(float(np.mean(sec[k]["in_layer_accuracy"])), 6) for k in ("mlp", "svm")}
    val = np.asarray(m["mlp"]["val_accuracy"])
    out["best_layer_mlp"] = int(np.argmax(val))
    if "near_trigger" in out and "near_trigger_control" in out:
        diff = (np.asarray(m["near_trigger"]["mlp"]["in_layer_accuracy"])
                - np.asarray(m["near_trigger"]["control"]["mlp"]["in_layer_accuracy"]))
        out["near_trigger_gain_over_control_mlp"] = _r(diff)
    return out


def write_figures(run: RunDir, m: dict[str, Any]) -> list[Path]:
    """ICLA heatmaps (backdoored | clean control) per probe type and the per-layer accuracy curves."""
    paths = []
    for kind in ("mlp", "svm"):
        panels = [("backdoored model", m[kind]["icla"])]
        if "control" in m:
            panels.append(("clean base model (control)", m["control"][kind]["icla"]))
        fig, axes = new_figure(4.2 * len(panels) + 0.8, 4.0, ncols=len(panels), squeeze=False)
        im = None
        for ax, (title, mat) in zip(axes[0], panels, strict=True):
            im = ax.imshow(np.asarray(mat), vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
            ax.set_title(f"{kind.upper()} ICLA: {title}")
            ax.set_xlabel("test layer k")
            ax.set_ylabel("probe trained on layer i")
            ax.grid(False)
        fig.colorbar(im, ax=list(axes[0]), shrink=0.85, label="accuracy")
        paths.append(save_figure(fig, run.figures_dir / f"probe_icla_{kind}.png"))
    fig, ax = new_figure(7.0, 3.8)
    layers = np.arange(len(m["mlp"]["in_layer_accuracy"]))
    ax.plot(layers, m["mlp"]["in_layer_accuracy"], "-o", ms=3, color="C3", label="backdoored, MLP")
    ax.plot(layers, m["svm"]["in_layer_accuracy"], "--", color="C3", alpha=0.7, label="backdoored, SVM")
    if "control" in m:
        ax.plot(layers, m["control"]["mlp"]["in_layer_accuracy"], "-s", ms=3, color="C0", label="clean control, MLP")
        ax.plot(layers, m["control"]["svm"]["in_layer_accuracy"], "--", color="C0", alpha=0.7,
                label="clean control, SVM")
    near = m.get("near_trigger") or {}
    if "mlp" in near:
        ax.plot(layers, near["mlp"]["in_layer_accuracy"], "-^", ms=3, color="C1",
                label="trigger vs near trigger, backdoored, MLP")
        if "control" in near:
            ax.plot(layers, near["control"]["mlp"]["in_layer_accuracy"], "-v", ms=3, color="C2",
                    label="trigger vs near trigger, clean control, MLP")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0.3, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Probe accuracy per layer ({m['n_prompts']} prompts, {m['feature_kind']})")
    ax.legend(fontsize=7, loc="lower right")
    paths.append(save_figure(fig, run.figures_dir / "probe_accuracy.png"))
    return paths


def run_stage(run: RunDir, options: dict[str, Any]) -> dict[str, Any]:
    """Pipeline entry point: run-wide options plus the ``probe`` section's options of :class:`ProbeStageConfig`."""
    return run_probe_stage(run, ProbeStageConfig.from_options(options))
