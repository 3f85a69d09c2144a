"""Compare two ``metrics.json`` files figure by figure (e.g. ``make demo`` before and after a refactor).

    python benchmarks/compare_metrics.py OLD/metrics.json NEW/metrics.json [--tol 1e-6] [--ignore PREFIX ...]

Walks both JSON trees in step and reports:

* keys (paths like ``attribution.top_heads[3][2]``) present in only one file;
* discrete values (strings, booleans, integers, None, lists of different lengths) that differ, exactly;
* for floats, the absolute difference; a table of the largest difference per top-level section, and every
  float path whose difference exceeds ``--tol``.

Timings (paths holding ``seconds``, ``timing`` or ``elapsed``) differ on every run and are left out by default
(``--keep-timings`` compares them too); ``--ignore`` leaves out further path prefixes. Exit status 1 when a
common continuous figure differs by more than ``--tol`` or a common discrete value differs, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TIMING_WORDS = ("seconds", "timing", "elapsed")


def walk(a: Any, b: Any, path: str = "") -> Iterator[tuple[str, str, Any, Any]]:
    """Yield ``(kind, path, old, new)`` for every leaf: kind is ``only_old``, ``only_new``, ``float``,
    ``discrete``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            p = f"{path}.{k}" if path else str(k)
            if k not in b:
                yield "only_old", p, a[k], None
            elif k not in a:
                yield "only_new", p, None, b[k]
            else:
                yield from walk(a[k], b[k], p)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from walk(x, y, f"{path}[{i}]")
    elif _is_float(a) and _is_float(b) and (isinstance(a, float) or isinstance(b, float)):
        yield "float", path, float(a), float(b)
    else:
        yield "discrete", path, a, b


def _is_float(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def float_diff(a: float, b: float) -> float:
    """``|a - b|``; 0 when both are NaN (or the same infinity), inf when exactly one is NaN."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if math.isinf(a) or math.isinf(b):
        return 0.0 if a == b else math.inf
    return abs(a - b)


def compare(old: Any, new: Any, tol: float, ignore: tuple[str, ...], keep_timings: bool) -> dict[str, Any]:
    """The comparison as a dict: ``only_old``/``only_new`` paths, ``discrete`` differences ``(path, old, new)``,
    ``over_tol`` float differences ``(path, old, new, diff)``, ``max_diff`` per top-level section and
    ``n_compared`` leaves."""
    out: dict[str, Any] = {"only_old": [], "only_new": [], "discrete": [], "over_tol": [], "max_diff": {},
                           "n_float": 0, "n_discrete": 0}
    for kind, path, a, b in walk(old, new):
        if path.startswith(ignore) or (not keep_timings and any(w in path for w in TIMING_WORDS)):
            continue
        section = path.split(".")[0].split("[")[0]
        if kind in ("only_old", "only_new"):
            out[kind].append(path)
        elif kind == "float":
            d = float_diff(a, b)
            out["n_float"] += 1
            out["max_diff"][section] = max(out["max_diff"].get(section, 0.0), d)
            if d > tol:
                out["over_tol"].append((path, a, b, d))
        else:
            out["n_discrete"] += 1
            out["max_diff"].setdefault(section, 0.0)
            if a != b:
                out["discrete"].append((path, a, b))
    return out


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def report(res: dict[str, Any], tol: float) -> str:
    lines = [f"compared {res['n_float']} float and {res['n_discrete']} discrete leaves (tol {tol:g})", "",
             "section                      max |diff| (floats)", "-" * 50]
    lines += [f"{s:<28} {d:.3g}" for s, d in sorted(res["max_diff"].items())]
    for kind, title in (("only_old", "keys only in the first file"), ("only_new", "keys only in the second file")):
        if res[kind]:
            lines += ["", f"{title} ({len(res[kind])}):"] + [f"  {p}" for p in res[kind]]
    if res["discrete"]:
        lines += ["", f"discrete values that differ ({len(res['discrete'])}):"]
        lines += [f"  {p}: {_short(a)} -> {_short(b)}" for p, a, b in res["discrete"]]
    if res["over_tol"]:
        lines += ["", f"floats differing by more than {tol:g} ({len(res['over_tol'])}):"]
        worst_first = sorted(res["over_tol"], key=lambda r: -r[3])
        lines += [f"  {p}: {a!r} -> {b!r} (diff {d:.3g})" for p, a, b, d in worst_first]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--tol", type=float, default=1e-6, help="largest allowed |difference| of a float (1e-6)")
    ap.add_argument("--ignore", nargs="*", default=[], help="path prefixes to leave out")
    ap.add_argument("--keep-timings", action="store_true", help="compare timing figures too")
    args = ap.parse_args(argv)
    try:
        old, new = (json.loads(p.read_text()) for p in (args.old, args.new))
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read the metrics ({e})", file=sys.stderr)
        return 2
    res = compare(old, new, args.tol, tuple(args.ignore), args.keep_timings)
    print(report(res, args.tol))
    return 1 if res["over_tol"] or res["discrete"] else 0


if __name__ == "__main__":
    sys.exit(main())
