"""Peers, same run, same numbers: one per-head activation patch in nnsight, TransformerLens and bkdattr.

    pip install -e ".[bench]"        # nnsight, transformer-lens (never core dependencies)
    python benchmarks/bench_peers.py [--run RUN] [--layers all|0,10,20,29] [--json PATH]

On a backdoored run (without ``--run``: the bench run, created or reused by ``bench_runs.py``), the attribute stage's
own prompt selection (32 clean prompts, their backdoor targets, ``abar`` from 256 triggered prompts) and the same
heads, each tool performs BAHA's patch (docs/METHOD.md section 3): add ``abar_{l,h} - a_{l,h}(x)`` to layer ``l``'s
attention output at ``p(x)`` (the last prompt position), with ``a_{l,h}(x) = z_{l,h}(x) W_O^{l,h}`` read from the
same forward pass, and score the teacher-forced target's first token, ``log p(y_1 | x)``. The CIE is that score
minus the clean one (one clean pass per chunk of ``--batch-size`` prompts):

* ``nnsight``: ``NNsight(model).trace(...)``, one forward per (head, chunk); the head's slice of the output
  projection's input (``o_proj`` reads the concatenated heads ``z``) gives ``a_{l,h}``, the difference is added to
  ``o_proj``'s output at ``p(x)``;
* ``transformer_lens``: ``TransformerBridge.boot_transformers`` on the run's model folder (a separate copy of the
  weights), ``run_with_hooks`` with ``blocks.l.attn.hook_z`` (read) and ``blocks.l.hook_attn_out`` (add), one
  forward per (head, chunk); where it does not install or load, the reason is printed and stored;
* bkdattr ``exact`` (first-token score only, heads batched per layer) and ``attribution`` (first order).

``--teacher-force full`` (default) feeds prompt + whole target to the peers, as the method states the patch;
``prompt`` feeds the prompt alone, which is all the first-token score needs (a faster peer, the same numbers).
Printed: seconds per head of each tool, the speed ratios, and max |CIE - CIE_exact| over every (prompt, head).
``--json PATH`` writes ``nnsight_s_per_head``, ``exact_s_per_head``, ``attribution_s_per_head``,
``ratio_exact_vs_nnsight``, ``max_abs_diff_nnsight``, the same with ``transformer_lens`` (or
``transformer_lens_error``), ``max_abs_diff_attribution`` and context keys. Timings are wall clock with
``--threads`` torch threads; on a shared machine they are inflated (the load average is stored with them).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

METRIC = "first_token_logprob"
Heads = Sequence[tuple[int, int]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench_runs import add_run_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--n-prompts", type=int, default=32, help="clean attribution prompts")
    p.add_argument("--n-mean-prompts", type=int, default=256, help="triggered prompts for abar")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layers: every head of each is patched")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per chunk (every tool)")
    p.add_argument("--teacher-force", choices=["full", "prompt"], default="full",
                   help="peers' input: prompt + whole target (full) or the prompt alone")
    p.add_argument("--peers", default="nnsight,transformer_lens", help="peers to run (comma-separated)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: BKDATTR_THREADS or torch)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


# ---- the shared inputs: chunks of right-padded prompt (+ target) rows ----------------------------------------------
def chunks(tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int,
           teacher_force: str = "full") -> list[dict]:
    """``[{input_ids, attention_mask, rows, pos, y1}]``: right-padded rows (prompt + target, or cut after the last
    ``p(x)`` with ``teacher_force="prompt"``), ``pos`` = ``p(x)`` per row, ``y1`` the first target token."""
    from bkdattr.core.prompts import encode_with_targets

    out = []
    for i in range(0, len(prompts), batch_size):
        b = encode_with_targets(tokenizer, list(prompts[i:i + batch_size]), list(targets[i:i + batch_size]))
        pos = b.last_pos.long()
        rows = torch.arange(len(pos))
        y1 = b.input_ids[rows, pos + 1]
        width = int(pos.max()) + 1 if teacher_force == "prompt" else b.input_ids.shape[1]
        out.append({"input_ids": b.input_ids[:, :width], "attention_mask": b.attention_mask[:, :width],
                    "rows": rows, "pos": pos, "y1": y1})
    return out


def first_token_logprob(logits: torch.Tensor, c: dict) -> torch.Tensor:
    """``log p(y_1 | x)`` per row from full logits ``[B, W, V]`` (float32)."""
    lg = logits[c["rows"], c["pos"]].float()
    return lg.gather(-1, c["y1"][:, None]).squeeze(-1) - torch.logsumexp(lg, -1)


def _sweep(run_chunk: Callable[[dict, int, int | None], torch.Tensor], cs: list[dict], heads: Heads,
           n_layers: int, n_heads: int) -> tuple[torch.Tensor, float]:
    """CIE ``[N, L, H]`` (NaN off ``heads``) from ``run_chunk(chunk, layer, head) -> [B]`` scores (``layer=None``:
    the clean pass), and the seconds it took."""
    t0 = time.perf_counter()
    parts = []
    for c in cs:
        cie = torch.full((len(c["rows"]), n_layers, n_heads), float("nan"))
        clean = run_chunk(c, None, None)
        for layer, h in heads:
            cie[:, layer, h] = run_chunk(c, layer, h) - clean
        parts.append(cie)
    return torch.cat(parts), time.perf_counter() - t0


# ---- nnsight ---------------------------------------------------------------------------------------------------------
def _envoy(root, name: str):
    """The nnsight envoy of the submodule ``name`` (``model.layers.3.self_attn.o_proj``)."""
    e = root
    for part in name.split("."):
        e = e[int(part)] if part.isdigit() else getattr(e, part)
    return e


@torch.no_grad()
def nnsight_cie(lm, prompts: Sequence[str], targets: Sequence[str], abar: torch.Tensor, heads: Heads,
                batch_size: int = 8, teacher_force: str = "full") -> tuple[torch.Tensor, float]:
    """First-token CIE ``[N, L, H]`` of ``heads`` patched with nnsight (one ``trace`` per head and chunk) and
    the seconds it took. The output projection of each layer must be an ``nn.Linear`` over the concatenated heads
    (Llama, Qwen2, Mistral, Gemma)."""
    from nnsight import NNsight

    arch, model = lm.arch, lm.model
    names = {m: n for n, m in model.named_modules()}
    proj = [names[arch.out_proj[layer]] for layer in range(arch.n_layers)]
    d_h = arch.d_head
    nn_model = NNsight(model)
    cs = chunks(lm.tokenizer, prompts, targets, batch_size, teacher_force)

    def run_chunk(c: dict, layer: int | None, h: int | None) -> torch.Tensor:
        with nn_model.trace(input_ids=c["input_ids"], attention_mask=c["attention_mask"]):
            if layer is not None:
                o = _envoy(nn_model, proj[layer])
                w = arch.out_proj[layer].weight[:, h * d_h:(h + 1) * d_h].float()  # [d, d_h]: W_O of head h
                z = o.input[c["rows"], c["pos"], h * d_h:(h + 1) * d_h].float()  # [B, d_h]
                delta = abar[layer, h][None] - z @ w.T  # abar_{l,h} - a_{l,h}(x)
                out = o.output
                out[c["rows"], c["pos"]] += delta.to(out.dtype)
            score = first_token_logprob(nn_model.output.logits, c).save()
        return score

    return _sweep(run_chunk, cs, heads, arch.n_layers, arch.n_heads)


# ---- TransformerLens ------------------------------------------------------------------------------------------------
def boot_transformer_lens(model_dir: str | Path, lm):
    """A ``TransformerBridge`` on its own copy of ``lm``'s weights (``model_dir`` gives the config)."""
    import copy

    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(model_dir), hf_model=copy.deepcopy(lm.model),
                                               tokenizer=lm.tokenizer, device="cpu")


@torch.no_grad()
def transformer_lens_cie(bridge, lm, prompts: Sequence[str], targets: Sequence[str], abar: torch.Tensor,
                         heads: Heads, batch_size: int = 8, teacher_force: str = "full") -> tuple[torch.Tensor, float]:
    """First-token CIE ``[N, L, H]`` of ``heads`` patched with TransformerLens hooks (``hook_z`` read,
    ``hook_attn_out`` added to), one ``run_with_hooks`` per head and chunk, and the seconds it took."""
    arch = lm.arch
    cs = chunks(lm.tokenizer, prompts, targets, batch_size, teacher_force)

    def run_chunk(c: dict, layer: int | None, h: int | None) -> torch.Tensor:
        hooks = []
        if layer is not None:
            w = bridge.blocks[layer].attn.W_O[h].float()  # [d_h, d]
            seen: dict = {}

            def read_z(z, hook):
                seen["a"] = z[c["rows"], c["pos"], h].float() @ w  # [B, d]
                return z

            def add(out, hook):
                out = out.clone()
                out[c["rows"], c["pos"]] += (abar[layer, h][None] - seen["a"]).to(out.dtype)
                return out

            hooks = [(f"blocks.{layer}.attn.hook_z", read_z), (f"blocks.{layer}.hook_attn_out", add)]
        logits = bridge.run_with_hooks(c["input_ids"], attention_mask=c["attention_mask"], fwd_hooks=hooks)
        return first_token_logprob(logits, c)

    return _sweep(run_chunk, cs, heads, arch.n_layers, arch.n_heads)


# ---- the benchmark --------------------------------------------------------------------------------------------------
def select_heads(spec: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Every head of the layers in ``spec`` (``all`` or ``0,10,20``); one-line error for a bad layer."""
    from bkdattr.core.errors import ConfigError

    if spec.strip() == "all":
        layers = list(range(n_layers))
    else:
        try:
            layers = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--layers {spec!r}: write 'all' or comma-separated layer numbers") from None
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad or not layers:
            raise ConfigError(f"--layers {spec!r}: layers must be in 0..{n_layers - 1}")
    return [(layer, h) for layer in layers for h in range(n_heads)]


def max_diff(a: torch.Tensor, b: torch.Tensor, heads: Heads) -> float:
    li = torch.tensor([x for x, _ in heads])
    hi = torch.tensor([h for _, h in heads])
    return float((a[:, li, hi] - b[:, li, hi]).abs().max())


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from bench_runs import ensure_run
    from bkdattr.attribution import attribute, mean_contributions
    from bkdattr.attribution.stage import AttributeConfig, select_examples
    from bkdattr.core.io import write_json
    from bkdattr.core.rundir import RunDir
    from bkdattr.core.runtime import set_threads
    from bkdattr.inject.data import load_splits

    args = parse_args(argv)
    set_threads(args.threads)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    run_path = ensure_run(args.run, ("inject",), threads=args.threads, dry_run=args.dry_run)
    if args.dry_run:
        print(f"would patch the heads of layers {args.layers} with {', '.join(peers)}, exact and attribution; "
              f"{args.n_prompts} prompts, batch {args.batch_size}, teacher forcing '{args.teacher_force}'")
        return {}
    console = Console()
    run = RunDir(run_path)
    cfg = AttributeConfig(n_prompts=args.n_prompts, n_mean_prompts=args.n_mean_prompts, batch_size=args.batch_size)
    clean, mean_ex = select_examples(load_splits(run), cfg)
    prompts, targets = [e.prompt for e in clean], [e.backdoor_output for e in clean]
    lm = run.load_model()
    abar = mean_contributions(lm, [e.triggered for e in mean_ex])
    heads = select_heads(args.layers, lm.arch.n_layers, lm.arch.n_heads)
    out: dict = {"run": str(run.path), "n_prompts": len(prompts), "n_mean_prompts": len(mean_ex),
                 "n_heads": len(heads), "layers": sorted({x for x, _ in heads}), "batch_size": args.batch_size,
                 "metric": METRIC, "teacher_force": args.teacher_force, "threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                 "attn_implementation": getattr(lm.model.config, "_attn_implementation", None),
                 "load_average_start": os.getloadavg()[0]}

    kw = dict(batch_size=args.batch_size, metrics=[METRIC], progress=False)
    ex = attribute(lm, prompts, targets, abar, "exact", METRIC, heads, **kw)
    est = attribute(lm, prompts, targets, abar, "attribution", METRIC, heads, **kw)
    ref = ex.cie[METRIC]
    n = len(heads)
    print(f"exact {ex.seconds:.1f} s, attribution {est.seconds:.1f} s for {n} heads", flush=True)
    out.update(exact_s=ex.seconds, exact_s_per_head=ex.seconds / n, exact_strategy=ex.info.get("strategy"),
               attribution_s=est.seconds, attribution_s_per_head=est.seconds / n,
               ratio_attribution_vs_exact=ex.seconds / est.seconds,
               max_abs_diff_attribution=max_diff(est.cie[METRIC], ref, heads))

    if "nnsight" in peers:
        try:
            import nnsight

            cie, s = nnsight_cie(lm, prompts, targets, abar, heads, args.batch_size, args.teacher_force)
            print(f"nnsight {s:.1f} s", flush=True)
            out.update(nnsight_version=nnsight.__version__, nnsight_s=s, nnsight_s_per_head=s / n,
                       ratio_exact_vs_nnsight=s / ex.seconds, ratio_attribution_vs_nnsight=s / est.seconds,
                       max_abs_diff_nnsight=max_diff(cie, ref, heads))
        except ImportError as e:
            out["nnsight_error"] = f"not installed ({e}); pip install -e '.[bench]'"
    if "transformer_lens" in peers:
        try:
            import transformer_lens  # noqa: F401

            bridge = boot_transformer_lens(run.path / "model", lm)
            cie, s = transformer_lens_cie(bridge, lm, prompts, targets, abar, heads, args.batch_size,
                                          args.teacher_force)
            del bridge
            print(f"transformer_lens {s:.1f} s", flush=True)
            out.update(transformer_lens_s=s, transformer_lens_s_per_head=s / n,
                       ratio_exact_vs_transformer_lens=s / ex.seconds,
                       ratio_attribution_vs_transformer_lens=s / est.seconds,
                       max_abs_diff_transformer_lens=max_diff(cie, ref, heads))
        except ImportError as e:
            out["transformer_lens_error"] = f"not installed ({e}); pip install -e '.[bench]'"
        except Exception as e:  # a peer that installs but cannot load the model: say why, keep the others
            out["transformer_lens_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    out["load_average_end"] = os.getloadavg()[0]

    t = Table(title=f"bench_peers: {run.path.name}, {len(prompts)} prompts, {n} heads (layers "
                    f"{args.layers}), first-token CIE, {out['threads']} thread(s)")
    for col, j in (("tool", "left"), ("s/head", "right"), ("time vs exact", "right"),
                   ("max |CIE - exact|", "right")):
        t.add_column(col, justify=j)
    for name, key in (("bkdattr exact", "exact"), ("bkdattr attribution (first order)", "attribution"),
                      ("nnsight", "nnsight"), ("TransformerLens (bridge)", "transformer_lens")):
        if f"{key}_s_per_head" in out:
            ratio = "" if key == "exact" else f"{out[f'{key}_s_per_head'] / out['exact_s_per_head']:.2f}x"
            diff = "0 (reference)" if key == "exact" else f"{out[f'max_abs_diff_{key}']:.2e}"
            t.add_row(name, f"{out[f'{key}_s_per_head']:.4f}", ratio, diff)
        elif f"{key}_error" in out:
            t.add_row(name, "-", "-", out[f"{key}_error"])
    console.print(t)
    console.print(f"load average: {out['load_average_start']:.1f} at start, {out['load_average_end']:.1f} at end; "
                  "attribution is first-order, so its difference is an approximation error, not a bug")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    from bkdattr.core.runtime import tune_allocator

    tune_allocator()  # the stable-timing allocator settings the CLI applies
    main()
