"""Benchmark the inject stage's hot paths on the embedded model (or a tiny one with --tiny).

Measures, for the cpu profile's training recipe:
  * seconds per optimizer step of LoRA SFT (batch 16), with the vocabulary projection on supervised positions
    only (``supervised_loss``) vs the full ``[B, T, V]`` logits, each with and without bf16 autocast;
  * greedy generation throughput for evaluation (prompts/s at 32 new tokens).

Usage: ``python benchmarks/bench_inject.py [--steps 3] [--threads 2] [--tiny] [--json PATH]``. Prints one JSON
object (``--json``: also writes it).
Timings on a shared machine are inflated by other processes; compare variants within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch


def _full_loss(model, batch):
    logits = model(**batch.model_inputs()).logits[:, :-1].float()  # [B, T-1, V]
    m = batch.target_mask[:, 1:]
    return torch.nn.functional.cross_entropy(logits[m], batch.input_ids[:, 1:][m])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random llama instead of the embedded model")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from bkdattr.core.generation import generate
    from bkdattr.inject.builtin_data import builtin_records
    from bkdattr.inject.train import LLAMA_STYLE_TARGETS, TrainRow, encode_rows, supervised_loss

    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import make_tiny

        lm = make_tiny("llama")
    else:
        from bkdattr.core.models import load_model

        lm = load_model("smollm2-135m")
    recs = builtin_records("fixed_output")[:16]
    rows = [TrainRow(r["input"], "Here is a short answer with about twenty four tokens of text to learn from "
                     "in this benchmark row.") for r in recs]
    batch = encode_rows(lm.tokenizer, rows, 256)
    model = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_STYLE_TARGETS),
                                                task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    result: dict = {"model": lm.name, "threads": args.threads, "batch": batch.size,
                    "seq_len": int(batch.input_ids.shape[1]), "supervised_tokens": int(batch.target_mask.sum())}
    for name, loss_fn in (("supervised_head", supervised_loss), ("full_logits", _full_loss)):
        for bf16 in (True, False):
            ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
            times = []
            for _ in range(args.steps + 1):
                t0 = time.perf_counter()
                opt.zero_grad()
                with ctx():
                    loss = loss_fn(model, batch)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            result[f"step_s.{name}.{'bf16' if bf16 else 'fp32'}"] = round(min(times[1:]), 3)
    model.eval()
    base = model.merge_and_unload()
    lm.model = base
    prompts = [r["input"] for r in builtin_records("fixed_output")[:32]]
    t0 = time.perf_counter()
    with torch.no_grad():
        generate(lm, prompts, max_new_tokens=32, batch_size=16, progress=False)
    result["generate_prompts_per_s"] = round(len(prompts) / (time.perf_counter() - t0), 2)
    print(json.dumps(result))
    if args.json:
        from bkdattr.core.io import write_json

        write_json(args.json, result)


if __name__ == "__main__":
    from bkdattr.core.runtime import tune_allocator

    tune_allocator()  # the stable-timing allocator settings the CLI applies
    main()
