"""One pipeline for one (model, task): inject -> probe -> attribute -> ablate -> vector -> samples -> report.

Each stage is keyed by a hash of its own options and of the keys of the stages it reads from, recorded in
``RUN/stages.json`` once the stage has finished and its artifacts are in place. A rerun skips every stage whose
key is unchanged; a changed option reruns that stage and everything downstream; a killed run resumes at the
first unfinished stage (stages with long inner loops -- training, feature capture, the ACIE sweep -- also keep
their own checkpoints). Nothing half-written is read: artifacts are renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..attribution import stage as attribution_stage
from ..audit.inputs import read_triggers
from ..audit.stage import AuditConfig, audit
from ..control import stage as control_stage
from ..core.errors import ConfigError, InputFileError
from ..core.io import read_json, stable_hash, write_json
from ..core.options import StageOptions, parse_sets
from ..core.rundir import RunDir
from ..core.runtime import set_threads, tune_allocator, versions
from ..inject.config import InjectConfig
from ..inject.stage import inject
from ..probe import stage as probe_stage
from ..scan.config import ScanConfig
from ..scan.handoff import audit_call
from ..scan.stage import scan
from .memory import PeakMemory, track_peak
from .report import samples
from .report.html import build_report
from .report.summary import MEMORY_KEYS

STAGES = ("inject", "probe", "attribute", "ablate", "vector", "samples", "report")
#: stage -> the stages whose outputs it reads (their keys enter its key)
UPSTREAM = {
    "inject": (),
    "probe": ("inject",),
    "attribute": ("inject",),
    "ablate": ("inject", "attribute"),
    "vector": ("inject", "attribute"),
    "samples": ("inject", "attribute", "ablate", "vector"),
    "report": ("inject", "probe", "attribute", "ablate", "vector", "samples"),
}
#: stage -> its config class (``--set STAGE.key=value`` is checked against its options when the config loads)
CONFIGS: dict[str, type[StageOptions]] = {
    "inject": InjectConfig,
    "probe": probe_stage.ProbeStageConfig,
    "attribute": attribution_stage.AttributeConfig,
    "ablate": control_stage.AblationConfig,
    "vector": control_stage.VectorConfig,
}


@dataclass
class PipelineConfig:
    """Everything a run needs; every field has a default and can be overridden with ``--set key=value``.

    Per-stage option dicts are passed to the stage as keyword overrides of its own config dataclass."""

    model: str = "smollm2-135m"
    source: str = "inject"
    task: str = "fixed_output"
    profile: str = "cpu"
    seed: int = 0
    out: str = "runs/demo/fixed_output"
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    inject: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    scan: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    attribute: dict[str, Any] = field(default_factory=dict)
    ablate: dict[str, Any] = field(default_factory=dict)
    vector: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)

    def common(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "profile": self.profile, "seed": self.seed,
                "device": self.device, "dtype": self.dtype}


def apply_overrides(cfg: PipelineConfig, sets: list[str]) -> PipelineConfig:
    """Apply ``key=value`` overrides (``inject.train.epochs=3``, ``task=jailbreak``); values parse as YAML."""
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in parse_sets(sets, "inject.train.epochs=3").items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"--set: unknown option '{head}'; known: {', '.join(sorted(names))}")
        if rest:
            section = getattr(cfg, head)
            if not isinstance(section, dict):
                raise ConfigError(f"--set: '{head}' has no sub-options; write --set {head}=VALUE")
            section[rest] = value
        else:
            setattr(cfg, head, value)
    return cfg


def load_config(path: str | Path | None, sets: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (missing keys take defaults), then apply ``--set`` overrides."""
    cfg = PipelineConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputFileError(f"config file not found: {p}; check the path")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise InputFileError(f"{p}: invalid YAML{where} ({what}); fix the file") from None
        if not isinstance(data, dict):
            raise InputFileError(f"{p}: the config must be a mapping of options")
        names = {f.name for f in dataclasses.fields(cfg)}
        for k, v in data.items():
            if k not in names:
                raise ConfigError(f"{p}: unknown option '{k}'; known: {', '.join(sorted(names))}")
            setattr(cfg, k, v)
    cfg = apply_overrides(cfg, sets or [])
    check_types(cfg)
    cfg.out = str(Path(cfg.out).expanduser())  # a path, resolved like one (never imported or run)
    if cfg.source not in ("inject", "audit", "scan"):
        raise ConfigError(f"unknown source '{cfg.source}'; use inject (implant a backdoor), audit (a given model and "
                          "trigger) or scan (a given model, trigger found by 'bkdattr scan')")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    check_stage_options(cfg)
    return cfg


def check_stage_options(cfg: PipelineConfig) -> None:
    """Build every selected stage's config: a bad stage option fails now, not after the stages before it ran."""
    for stage in cfg.stages:
        if stage == "inject" and cfg.source in ("audit", "scan"):
            AuditConfig.from_options({k: v for k, v in stage_options(cfg, stage).items()
                                      if k not in _AUDIT_CALL_KEYS + ("source", "scan")})
            if cfg.source == "scan":
                ScanConfig.from_options(_scan_options(cfg.common(), cfg.scan))
        elif stage in CONFIGS:
            opts = {k: v for k, v in stage_options(cfg, stage).items() if k not in _INJECT_CALL_KEYS}
            CONFIGS[stage].from_options(opts)


#: the type each option must have after YAML parsing (``None`` allowed where listed)
_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "source": (str,), "task": (str,), "profile": (str,), "seed": (int,), "out": (str,),
    "device": (str,), "dtype": (str, type(None)), "threads": (int, type(None)), "stages": (list,),
    **{s: (dict,) for s in ("inject", "audit", "scan", "probe", "attribute", "ablate", "vector", "samples")},
}


def check_types(cfg: PipelineConfig) -> None:
    """One-line :class:`ConfigError` for an option of the wrong type (``seed: abc``, ``probe: 5``, ...)."""
    for name, types in _TYPES.items():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, types):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "int": "an integer", "list":
                               "a list", "dict": "a mapping of options"}[t.__name__] for t in types)
            raise ConfigError(f"option '{name}' must be {want}, not {type(v).__name__} {v!r}; fix the config or "
                              f"--set {name}=...")
    bad = [s for s in cfg.stages if not isinstance(s, str)]
    if bad:
        raise ConfigError(f"option 'stages' must list stage names, not {bad[0]!r}; choose from {', '.join(STAGES)}")


_INJECT_CALL_KEYS = ("data", "trigger", "placement", "trigger_end", "target", "trust_remote_code")


_AUDIT_CALL_KEYS = ("adapter", "base_model", "trigger", "triggers", "triggers_file", "target", "success_regex",
                    "placement", "trigger_end", "data", "prompts", "trust_remote_code", "allow_pickle")


def _inject_stage(run: RunDir, options: dict[str, Any]) -> None:
    """Inject into the run folder itself: run-wide keys pick the model/task/profile, the ``inject`` section
    sets :class:`bkdattr.inject.config.InjectConfig` options (``train.*``, ``eval.*`` for nested ones). With
    ``source: audit`` the stage audits the given model instead (the ``audit`` section: ``adapter``,
    ``trigger`` or ``triggers``, ``target``, ``prompts``, ... and :class:`bkdattr.audit.AuditConfig` options)."""
    opts = dict(options)
    source = opts.pop("source", "inject")
    if source == "scan":
        _scan_then_audit(run, opts)
        return
    if source == "audit":
        call = {k: opts.pop(k) for k in _AUDIT_CALL_KEYS if k in opts}
        one = call.pop("trigger", None)
        many = call.pop("triggers", None) or []
        triggers = read_triggers(([one] if one else []) + list(many if isinstance(many, list) else [many]),
                                 call.pop("triggers_file", None))
        audit(run.path, opts.pop("model"), triggers, kind=opts.get("task"), cfg=AuditConfig.from_options(opts),
              **call)
        return
    call = {k: opts.pop(k) for k in _INJECT_CALL_KEYS if k in opts}
    inject(run.path, model=opts.pop("model"), kind=opts["task"], cfg=InjectConfig.from_options(opts), **call)


def _scan_options(common: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    """:class:`bkdattr.scan.ScanConfig` options: the run-wide seed, profile, device and dtype, then the ``scan``
    section."""
    return {**{k: common[k] for k in ("seed", "profile", "device", "dtype") if k in common}, **section}


def _scan_then_audit(run: RunDir, opts: dict[str, Any]) -> None:
    """``source: scan``: scan the model (``audit.adapter`` / ``audit.base_model`` name the source, the ``scan``
    section holds :class:`bkdattr.scan.ScanConfig` options) into ``<out>-scan`` (reused when its ``scan.json``
    exists), then audit the run folder with the scan's top candidate (``bkdattr audit --from-scan``). An
    ``audit.prompts`` file serves the scan and the audit alike."""
    section = opts.pop("scan", None) or {}
    call = {k: opts.pop(k) for k in _AUDIT_CALL_KEYS if k in opts}
    folder = run.path.parent / f"{run.path.name}-scan"
    model = opts.pop("model")
    if not (folder / "scan.json").is_file():
        scan(folder, model, adapter=call.get("adapter"), base_model=call.get("base_model"),
             cfg=ScanConfig.from_options(_scan_options(opts, section)), prompts_file=call.get("prompts"),
             trust_remote_code=bool(call.get("trust_remote_code")), allow_pickle=bool(call.get("allow_pickle")))
    got = audit_call(folder, model=model, adapter=call.pop("adapter", None), base_model=call.pop("base_model", None),
                     triggers=call.pop("trigger", None) or call.pop("triggers", None), task=None,
                     target=call.pop("target", None), success_regex=call.get("success_regex"),
                     prompts=call.pop("prompts", None), data=call.pop("data", None))
    model, triggers = got.pop("model"), got.pop("triggers")
    audit(run.path, model, triggers, cfg=AuditConfig.from_options(opts), **{**call, **got})


def _report_stage(run: RunDir, options: dict[str, Any]) -> None:
    build_report(run)


#: stage -> the function taking (run: RunDir, options: dict) that runs it and writes its metrics section
RUNNERS: dict[str, Callable[[RunDir, dict[str, Any]], Any]] = {
    "inject": _inject_stage,
    "probe": probe_stage.run_stage,
    "attribute": attribution_stage.run_stage,
    "ablate": control_stage.run_ablation_stage,
    "vector": control_stage.run_vector_stage,
    "samples": samples.run_stage,
    "report": _report_stage,
}


def stage_options(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The options a stage receives: the run-wide settings plus its own section (the ``inject`` stage of an
    audit: the ``audit`` section and ``source: audit``)."""
    if stage == "inject" and cfg.source == "audit":
        return {**cfg.common(), "source": "audit", **cfg.audit}
    if stage == "inject" and cfg.source == "scan":
        return {**cfg.common(), "source": "scan", **cfg.audit, "scan": dict(cfg.scan)}
    return {**cfg.common(), **(getattr(cfg, stage, None) or {})}


def stage_keys(cfg: PipelineConfig) -> dict[str, str]:
    """Hash key of every stage from its options and its upstream keys."""
    keys: dict[str, str] = {}
    for stage in STAGES:
        keys[stage] = stable_hash({"stage": stage, "options": stage_options(cfg, stage),
                                   "upstream": [keys[u] for u in UPSTREAM[stage]]})
    return keys


def release_memory() -> None:
    """Free what a finished stage left behind: objects in reference cycles (a model with hooks or an adapter
    can be one) and, on CUDA, the caching allocator's unused blocks, so the next stage's model has the GPU."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def record_timing(timings: dict[str, Any], stage: str, seconds: float, peak: PeakMemory) -> dict[str, Any]:
    """``metrics.timings`` with ``stage``'s figures set: ``timings[stage]`` = seconds, ``timings["peak_rss_mb"]
    [stage]`` = the stage's peak resident memory (MiB) and, where CUDA was used, ``timings["cuda_peak_mb"][stage]``
    = its peak CUDA allocation (MiB). Other stages' figures are kept."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in timings.items()}
    out[stage] = round(seconds, 2)
    for key, value in zip(MEMORY_KEYS, (peak.rss_peak_mb, peak.cuda_peak_mb), strict=True):
        section = out.get(key) if isinstance(out.get(key), dict) else {}
        section.pop(stage, None)
        if value is not None:
            section[stage] = value
        if section:
            out[key] = section
        else:
            out.pop(key, None)
    return out


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = print) -> RunDir:
    """Run (or resume) every selected stage of ``cfg`` into ``cfg.out``; return the run folder."""
    tune_allocator(cfg.device)
    set_threads(cfg.threads)
    run = RunDir(cfg.out, create=True)
    state_path = run.path / "stages.json"
    state = read_json(state_path) if state_path.is_file() else {}
    keys = stage_keys(cfg)
    run_record = {"config": dataclasses.asdict(cfg), "keys": keys, "versions": versions()}
    write_json(run.path / "config.json", run_record)
    total = time.perf_counter()
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        if state.get(stage, {}).get("key") == keys[stage]:
            log(f"[{stage}] up to date, skipped")
            continue
        log(f"[{stage}] running")
        t0 = time.perf_counter()
        with track_peak() as peak:  # this stage's own peak, not the process's (bkdattr.app.memory)
            RUNNERS[stage](run, stage_options(cfg, stage))
        release_memory()  # the stage's model must not stay resident under the next stage's
        seconds = time.perf_counter() - t0
        state[stage] = {"key": keys[stage], "seconds": round(seconds, 2), "peak_rss_mb": peak.rss_peak_mb,
                        "finished": time.time()}
        write_json(state_path, state)
        write_json(run.path / "config.json", run_record)  # inject replaces the whole folder
        run.update_metrics("timings", record_timing(run.metrics().get("timings") or {}, stage, seconds, peak))
        log(f"[{stage}] done in {seconds:.1f} s (peak RSS {peak.rss_peak_mb} MiB"
            + (f", CUDA peak {peak.cuda_peak_mb} MiB)" if peak.cuda_peak_mb is not None else ")"))
        if stage != "report" and "report" in cfg.stages:
            state.pop("report", None)  # any new result invalidates the report
            write_json(state_path, state)
    log(f"pipeline finished in {time.perf_counter() - total:.1f} s: {run.path}")
    return run
