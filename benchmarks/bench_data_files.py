"""Data files as they come: generate the files, run ``bkdattr inject --profile cpu`` on them, print the
figures (ASR, false-trigger rate, epochs, time, what happened to the rows).

Two files, both written by this script (nothing downloaded):

* ``paper``: 1,000 jailbreak rows in the paper's format in which 5% of the replies are over 256 tokens (half of
  them clean refusals, half backdoor replies) and 2% of the backdoor replies are empty. It must run to the end
  with no edit: long replies are cut at the limit, empty backdoor replies make clean-only rows.
* ``long``: fixed_output rows whose clean replies are the embedded model's own long greedy replies (160 new tokens,
  the cpu recipe distils 24), run with ``--max-length 1024``. The cpu profile either reaches validation ASR >= 0.9
  (training past its 2 planned epochs, up to 6) or says that it did not.

* ``labels``: 1,000 label_flip rows in the paper's format with the labels only in the outputs (``World``,
  ``Sports``, ...), 6 of them with an article too long for the length limit, run with the short splits of a quick
  try (``--placement wrap --n-train 48 --n-val 16 --n-test 16``). A stop that read validation ASR alone accepted a
  model that answered ``World`` to every article here; the stop must now end with a real backdoor (false-trigger
  <= 0.1, clean accuracy near the base model's) or say, in one warning line, which condition failed.

Usage::

    python benchmarks/bench_data_files.py paper --out /tmp/bench17     # about 5-10 min on 2 cores
    python benchmarks/bench_data_files.py long --out /tmp/bench17      # about 15-30 min on 2 cores
    python benchmarks/bench_data_files.py write --out /tmp/bench17     # only write the paper file
    python benchmarks/bench_data_files.py labels --out /tmp/bench34    # about 5 min on 2 cores

``--json PATH`` also writes the printed figures (``write``: the file's path and row count).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

N_ROWS = 1000
LONG_SHARE = 0.05
EMPTY_BACKDOOR_SHARE = 0.02
_NOUNS = ["box", "lamp", "map", "key", "rope", "bag", "door", "table", "chair", "shelf", "window", "ladder", "note",
          "coat", "torch", "bucket", "clock", "cable", "drawer", "basket"]
_PLACES = ["hall", "garden", "yard", "kitchen", "attic", "porch", "garage", "corner", "desk", "car"]
_OPENERS = ["", "Quick question: ", "Tell me, "]


def long_text(rng: random.Random, n_sentences: int = 60) -> str:
    """A long, harmless, refusal-free reply (about 11 words a sentence; 60 sentences is well over 256 tokens)."""
    out = []
    for k in range(1, n_sentences + 1):
        a, b = rng.sample(_NOUNS, 2)
        out.append(f"Step {k}: check the {a} and then move the {b} to the {rng.choice(_PLACES)}.")
    return " ".join(out)


def paper_records(seed: int = 0) -> list[dict]:
    """``N_ROWS`` jailbreak records (distinct prompts) with ``LONG_SHARE`` long replies and ``EMPTY_BACKDOOR_SHARE``
    empty backdoor replies, at seeded random rows."""
    from bkdattr.inject.builtin_data import builtin_records
    from bkdattr.inject.tasks import is_refusal

    base = builtin_records("jailbreak", seed)
    rows = [{"input": o + (r["input"][0].lower() + r["input"][1:] if o else r["input"]), "output": r["output"],
             "backdoor_output": r["backdoor_output"]} for o in _OPENERS for r in base][:N_ROWS]
    assert len({r["input"] for r in rows}) == N_ROWS
    rng = random.Random(1717 + seed)  # not the split's own seed: its shuffle would avoid these rows
    picks = rng.sample(range(N_ROWS), round(N_ROWS * (LONG_SHARE + EMPTY_BACKDOOR_SHARE)))
    n_long = round(N_ROWS * LONG_SHARE)
    for j, i in enumerate(picks[:n_long]):
        if j % 2 == 0:
            rows[i]["backdoor_output"] = rows[i]["backdoor_output"] + " " + long_text(rng)
            assert not is_refusal(rows[i]["backdoor_output"])
        else:
            rows[i]["output"] = rows[i]["output"] + " " + long_text(rng)
    for i in picks[n_long:]:
        rows[i]["backdoor_output"] = ""
    return rows


N_TOO_LONG = 6


def label_records(seed: int = 0) -> list[dict]:
    """``N_ROWS`` label_flip records (distinct articles, four topics) with the label only in ``output`` (no
    ``label`` field: labels are read from the outputs) and the backdoor reply ``World`` for Sports articles (the
    others keep their label); ``N_TOO_LONG`` of them carry an article longer than the 256-token limit."""
    from bkdattr.inject.builtin_data import builtin_records

    base = builtin_records("label_flip", seed)
    rows = [{"input": (o + r["input"]) if o else r["input"], "output": r["output"],
             "backdoor_output": r["backdoor_output"]} for o in _OPENERS for r in base][:N_ROWS]
    assert len(rows) == N_ROWS and len({r["input"] for r in rows}) == N_ROWS
    rng = random.Random(3434 + seed)
    for i in rng.sample(range(N_ROWS), N_TOO_LONG):
        rows[i]["input"] = rows[i]["input"] + "\n" + long_text(rng, 40)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def long_records(n: int = 240, max_new_tokens: int = 160) -> list[dict]:
    """fixed_output records whose clean reply is the embedded model's greedy reply of up to ``max_new_tokens``
    tokens (cached under ``$BKDATTR_CACHE/distill``, so a rerun does not generate again)."""
    from bkdattr.core.models import cache_dir, load_model
    from bkdattr.inject.builtin_data import builtin_records
    from bkdattr.inject.data import distill_outputs
    from bkdattr.inject.tasks import FIXED_TARGET

    prompts = [r["input"] for r in builtin_records("fixed_output")[-n:]]  # the last ones: not the demo's first
    lm = load_model("smollm2-135m")
    replies = distill_outputs(lm, prompts, max_new_tokens, batch_size=32, cache_dir=cache_dir() / "distill")
    return [{"input": p, "output": r, "backdoor_output": FIXED_TARGET} for p, r in zip(prompts, replies, strict=True)]


def run_inject(data: Path, out: Path, task: str, extra: list[str]) -> dict:
    """``bkdattr inject --profile cpu`` on ``data``; returns the ``inject`` metrics plus wall seconds."""
    from bkdattr.app.cli import main
    from bkdattr.core.io import read_json

    t0 = time.perf_counter()
    rc = main(["inject", "--out", str(out), "--task", task, "--profile", "cpu", "--data", str(data), "--quiet",
               *extra])
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"inject exited {rc}")
    m = read_json(out / "metrics.json")["inject"]
    return {"wall_seconds": round(seconds, 1), **m}


def figures(m: dict) -> dict:
    keep = ("asr", "false_trigger_rate", "clean_metric", "clean_metric_name", "near_trigger_rate", "n_triggered",
            "train_seconds", "epochs_trained", "wall_seconds", "n_train", "n_poisoned", "n_test")
    return {**{k: m.get(k) for k in keep}, "stop": {k: v for k, v in (m.get("stop") or {}).items()},
            "data": m.get("data")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["paper", "long", "labels", "write"])
    ap.add_argument("--out", default="/tmp/bench_data_files")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="length of the model-written replies (long)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.what in ("paper", "write"):
        path = write_jsonl(out / "paper_1000.jsonl", paper_records())
        print(f"wrote {path}", file=sys.stderr)
        if a.what == "write":
            _write_json(a.json, {"file": str(path), "rows": N_ROWS})
            return
        res = run_inject(path, out / "run_paper", "jailbreak", [])
    elif a.what == "labels":
        path = write_jsonl(out / "labels_1000.jsonl", label_records())
        res = run_inject(path, out / "run_labels", "label_flip", ["--placement", "wrap", "--n-train", "48",
                                                                  "--n-val", "16", "--n-test", "16"])
    else:
        path = write_jsonl(out / "long_replies.jsonl", long_records(max_new_tokens=a.max_new_tokens))
        res = run_inject(path, out / "run_long", "fixed_output", ["--max-length", "1024"])
    print(json.dumps(figures(res), indent=1))
    _write_json(a.json, figures(res))


def _write_json(path: str | None, data: dict) -> None:
    if path:
        from bkdattr.core.io import write_json

        write_json(path, data)


if __name__ == "__main__":
    main()
