"""Peak memory of the exact ACIE sweep (against the docs/METHOD.md formula) and of the long-prompt passes that used
to build full-vocabulary logits (before/after).

    python benchmarks/bench_memory.py [--json out.json] [--only exact,prefill,scoring] [--device cpu] [--dry-run]

Needs no backdoored run: memory does not depend on what the weights learned, so the embedded base model
(SmolLM2-135M, float32) is measured. Every measurement runs in its own fresh Python process (a stage's figures
must not include what the allocator kept from the one before) and is the peak of
:func:`bkdattr.app.memory.track_peak` around the measured call, minus the RSS at entry (the model and inputs already
loaded): the call's own working memory. On CUDA (``--device cuda``) the CUDA peak allocation is reported too.

* ``exact``: one chunk of ``batch`` prompts of ``W`` tokens with targets of ``T`` tokens, every head of layer 0
  (its replay runs every layer above it: the sweep's peak), ``heads_per_pass`` heads per pass; two settings.
  Printed beside :func:`bkdattr.attribution.exact_memory.exact_sweep_bytes` without the weights (the formula of
  docs/METHOD.md section 3, *GPU memory of the exact sweep*), and that formula's figures for a 7B Llama on an 80 GB GPU.
* ``prefill``: the greedy decoder's prefill over 8 prompts x 1,024 tokens (one new token), before (the LM head
  on every position: the full ``[B, S, V]`` logits) and after (``logits_to_keep=1``).
* ``scoring``: teacher-forced target log-probs over 8 prompts x ~1,024 tokens + a 16-token target: the model's
  full forward (``[B, S, V]`` logits), the body with a KV cache and the head on target rows (before), and the
  body without a KV cache (after: :func:`bkdattr.core.scoring.target_logprobs`).

CPU timings on a shared machine are inflated; memory figures are not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MB = 1024 * 1024
HERE = Path(__file__).resolve()
#: (batch, prompt tokens, target tokens, heads per pass) of the two exact settings measured
EXACT_SETTINGS = ((8, 256, 16, 9), (4, 512, 16, 3))
LONG = {"batch": 8, "tokens": 1024, "target_tokens": 16}


# ---- the formula: bkdattr.attribution.exact_memory.exact_sweep_bytes (docs/METHOD.md section 3) --------------------
LLAMA_7B = {"n_layers": 32, "n_heads": 32, "d_model": 4096, "n_kv_heads": 32, "d_head": 128, "d_ff": 11008,
            "vocab": 32000, "n_params": 6_738_415_616}
#: (prompt width, target tokens) of the 7B table: short chat prompts to long ones, all metrics / first-token only
SHAPES_7B = ((64, 16), (256, 16), (1024, 16), (1024, 1), (4096, 1))
GRID_7B = ((8, 32), (8, 16), (8, 8), (4, 8), (4, 4), (2, 4), (1, 1))


def llama7b_table(gpu_gb: float = 80.0) -> list[dict]:
    """The formula's peak (GB) for a 7B Llama in bf16 (96 prompts: the peak is per chunk, so it does not depend on
    the number of prompts) for each (prompt width, target) and (``--batch-size``, ``--heads-per-pass``); ``fits``:
    within the 85% of ``gpu_gb`` the memory default plans for."""
    from bkdattr.attribution.exact_memory import MEMORY_HEADROOM, exact_sweep_bytes

    m = LLAMA_7B
    rows = []
    for P, T in SHAPES_7B:
        for B, R in GRID_7B:
            est = exact_sweep_bytes(m["n_layers"], m["n_heads"], m["d_model"], m["n_kv_heads"], m["d_head"], P, T, 2,
                                    batch=B, heads_per_pass=R, n_params=m["n_params"], vocab=m["vocab"],
                                    d_ff=m["d_ff"])
            rows.append({"P": P, "T": T, "batch_size": B, "heads_per_pass": R, "peak_gb": round(est.total / 1e9, 1),
                         "fits": est.total <= gpu_gb * 1e9 * MEMORY_HEADROOM})
    return rows


# ---- the measurements (each in a child process) -------------------------------------------------------------
def _load(device: str):
    from bkdattr.core.models import load_model

    return load_model("smollm2-135m", device=device, dtype="float32")


def _prompt(tok, n_tokens: int, i: int) -> str:
    """A user message whose chat-templated prompt is about ``n_tokens`` tokens (distinct per ``i``)."""
    from bkdattr.core.prompts import encode_prompts

    words = [f"word{(i * 7 + k) % 50}" for k in range(n_tokens)]
    lo, hi = 1, len(words)
    while lo < hi:  # the longest message whose rendered prompt fits n_tokens
        mid = (lo + hi + 1) // 2
        if encode_prompts(tok, [" ".join(words[:mid])]).input_ids.shape[1] <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _target(tok, n_tokens: int) -> str:
    return " ".join(["yes"] * n_tokens)


def _measure(fn, device: str) -> dict:
    import gc

    import torch

    from bkdattr.app.memory import track_peak

    gc.collect()
    with track_peak() as pk:
        fn()
    out = {"rise_mb": round(pk.rss_rise / MB, 1), "peak_rss_mb": pk.rss_peak_mb, "method": pk.method}
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = pk.cuda_peak_mb
        out["cuda_before_mb"] = round(torch.cuda.memory_allocated() / MB, 1)
    return out


def child_exact(device: str, B: int, W: int, T: int, R: int) -> dict:
    import torch

    from bkdattr.attribution.exact import exact_sweep
    from bkdattr.attribution.means import mean_contributions
    from bkdattr.attribution.scores import encode_aligned

    lm = _load(device)
    a = lm.arch
    prompts = [_prompt(lm.tokenizer, W, i) for i in range(B)]
    targets = [_target(lm.tokenizer, T)] * B
    batch = encode_aligned(lm.tokenizer, prompts, targets)
    abar = mean_contributions(lm, prompts, batch_size=B)
    heads = [(0, h) for h in range(a.n_heads)]
    res = _measure(lambda: exact_sweep(lm, prompts, targets, abar, heads, batch_size=B, heads_per_pass=R,
                                       progress=False), device)
    from bkdattr.attribution.exact_memory import exact_sweep_bytes

    d_ff = int(getattr(lm.model.config, "intermediate_size", 4 * a.d_model))
    V = int(lm.model.get_output_embeddings().weight.shape[0])
    est = exact_sweep_bytes(a.n_layers, a.n_heads, a.d_model, a.n_kv_heads, a.d_head, batch.prompt_width,
                            batch.target_width, torch.finfo(lm.dtype).bits // 8, batch=B, heads_per_pass=R,
                            n_params=sum(p.numel() for p in lm.model.parameters()), vocab=V, d_ff=d_ff)
    pred = {k: round(v / MB, 1) for k, v in est.__dict__.items()}
    pred["working"] = round((est.total - est.weights) / MB, 1)  # what the measured rise is compared with
    return {"batch_size": B, "W": batch.prompt_width, "T": batch.target_width, "heads_per_pass": R,
            "mask_bytes": _mask_bytes(lm, batch), **res, "predicted_mb": pred}


def _mask_bytes(lm, batch) -> int:
    """Bytes per entry of the attention mask the decoder layers receive (0: none is passed)."""
    import torch

    from bkdattr.core.hooks import capture_layer_calls

    with torch.no_grad(), capture_layer_calls(lm.arch.layers[:1]) as calls:
        lm.model(**{k: v[:1] for k, v in (("input_ids", batch.input_ids), ("attention_mask", batch.attention_mask))},
                 use_cache=False)
    m = calls[0].kwargs.get("attention_mask") if calls[0] is not None else None
    return int(m.element_size()) if isinstance(m, torch.Tensor) else 0


def child_prefill(device: str, variant: str) -> dict:
    import torch

    from bkdattr.core import generation
    from bkdattr.core.prompts import encode_prompts

    lm = _load(device)
    texts = [_prompt(lm.tokenizer, LONG["tokens"], i) for i in range(LONG["batch"])]
    b = encode_prompts(lm.tokenizer, texts, padding_side="left").to(lm.device)
    if variant == "before":  # the prefill as it was: the LM head on every position
        generation.last_logits_kwargs = lambda model: {}
    with torch.no_grad():
        res = _measure(lambda: generation.greedy_decode(lm.model, b.input_ids, b.attention_mask, b.position_ids, 1,
                                                        [], compact=False), device)
    return {"variant": variant, "batch": b.size, "tokens": int(b.input_ids.shape[1]), **res}


def child_scoring(device: str, variant: str) -> dict:
    import torch

    from bkdattr.core.forward import body_and_head
    from bkdattr.core.prompts import encode_with_targets
    from bkdattr.core.scoring import target_logprobs, token_logprobs

    lm = _load(device)
    texts = [_prompt(lm.tokenizer, LONG["tokens"], i) for i in range(LONG["batch"])]
    b = encode_with_targets(lm.tokenizer, texts, [_target(lm.tokenizer, LONG["target_tokens"])] * len(texts))
    b = b.to(lm.device)
    inputs = b.model_inputs()
    cols = torch.arange(int(b.target_len.max()))
    src = (b.last_pos[:, None].cpu() + cols[None, :]).clamp(max=b.input_ids.shape[1] - 2)
    rows = torch.arange(b.size)[:, None]
    tgt = b.input_ids.cpu().gather(1, src + 1)

    def full_logits():  # the model's own forward: [B, S, V] logits, then the target rows
        logits = lm.model(**inputs).logits
        token_logprobs(logits[rows, src], tgt)

    def body_with_cache():  # the body (a KV cache built and held) and the LM head on the target rows
        body, head = body_and_head(lm.model)
        hidden = body(**inputs).last_hidden_state
        token_logprobs(head(hidden[rows, src]), tgt)

    fn = {"full_logits": full_logits, "body_with_cache": body_with_cache,
          "after": lambda: target_logprobs(lm.model, inputs, b)}[variant]
    with torch.no_grad():
        res = _measure(fn, device)
    return {"variant": variant, "batch": b.size, "tokens": int(b.input_ids.shape[1]), **res}


def _child(spec: dict, device: str) -> dict:
    """Run one measurement in a fresh process; its JSON result."""
    path = [str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    cmd = [sys.executable, str(HERE), "--device", device, "--child", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{spec}: child failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="exact,prefill,scoring", help="comma-separated: exact, prefill, scoring")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the 7B table, measure nothing")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        res = {"exact": child_exact, "prefill": child_prefill, "scoring": child_scoring}[kind](args.device, **spec)
        print(json.dumps(res))
        return res
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    plan = []
    if "exact" in only:
        plan += [{"kind": "exact", "B": B, "W": W, "T": T, "R": R} for B, W, T, R in EXACT_SETTINGS]
    if "prefill" in only:
        plan += [{"kind": "prefill", "variant": v} for v in ("before", "after")]
    if "scoring" in only:
        plan += [{"kind": "scoring", "variant": v} for v in ("full_logits", "body_with_cache", "after")]
    out: dict = {"device": args.device, "model": "smollm2-135m (float32)", "llama7b_80gb": llama7b_table()}
    if args.dry_run:
        print("would measure (one process each):", *[json.dumps(s) for s in plan], sep="\n  ")
    for spec in [] if args.dry_run else plan:
        res = _child(dict(spec), args.device)
        out.setdefault(spec["kind"], []).append(res)
        print(json.dumps({"kind": spec["kind"], **res}), flush=True)
    _print_7b(out["llama7b_80gb"])
    if args.json:
        sys.path.insert(0, str(HERE.parents[1] / "src"))
        from bkdattr.core.io import write_json

        write_json(args.json, out)
    return out


def _print_7b(rows: list[dict]) -> None:
    print("7B Llama (32 x 32 heads, d=4096), bf16, one 80 GB GPU -- formula (GB):")
    for r in rows:
        print(f"  P={r['P']:5d} T={r['T']:2d} --batch-size {r['batch_size']} --heads-per-pass "
              f"{r['heads_per_pass']:2d}: {r['peak_gb']:7.1f}{'' if r['fits'] else '  (does not fit)'}")


if __name__ == "__main__":
    main()
