"""Benchmarks run from a fresh clone: the bench run's folder is keyed by its settings, ``--run`` is checked, and
``run_all.py`` plans one JSON per script (nothing here trains a model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bkdattr.core.errors import InputFileError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_runs  # noqa: E402
import run_all  # noqa: E402


def test_run_path_is_keyed_by_settings(tmp_path):
    a = bench_runs.run_path(root=str(tmp_path))
    assert a == bench_runs.run_path(root=str(tmp_path))  # the same settings reuse the same folder
    assert a.parent == tmp_path and a.name.startswith("fixed_output-")
    assert bench_runs.run_path("jailbreak", root=str(tmp_path)) != a
    assert bench_runs.run_path(seed=1, root=str(tmp_path)) != a
    assert bench_runs.run_path(sets=["inject.n_train=24"], root=str(tmp_path)) != a


def test_run_path_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BKDATTR_BENCH_RUNS", str(tmp_path / "r"))
    assert bench_runs.run_path().parent == tmp_path / "r"


def test_ensure_run_given_run_is_checked(tmp_path):
    with pytest.raises(InputFileError, match="not a run folder"):
        bench_runs.ensure_run(str(tmp_path))
    (tmp_path / "run.json").write_text("{}")
    assert bench_runs.ensure_run(str(tmp_path)) == tmp_path


def test_ensure_run_dry_run_creates_nothing(tmp_path, capsys):
    out = bench_runs.ensure_run(None, ("inject", "attribute"), root=str(tmp_path), dry_run=True)
    assert not out.exists()
    assert "created; stages inject, attribute" in capsys.readouterr().out


@pytest.mark.parametrize("dry", [False, True])
def test_run_all_plans_every_script(tmp_path, dry):
    steps = run_all.plan(tmp_path, dry)
    tools = {"bench_runs", "run_all", "attribution_work", "gpu_check", "compare_metrics"}  # helpers, not benchmarks
    scripts = {p.stem for p in BENCH.glob("*.py")} - tools
    covered = {Path(c).stem for _, cmd, _ in steps for c in cmd if c.endswith((".py", ".sh"))}
    assert scripts <= covered and "gpu_check" in covered
    for name, cmd, writes in steps:
        if writes:
            assert str(tmp_path / f"{name}.json") in cmd
    if not dry:  # the full set: every script writes its JSON and none is given a run
        assert all(w for _, _, w in steps) and not any("--run" in cmd for _, cmd, _ in steps)


def test_run_all_unknown_name(tmp_path, capsys):
    assert run_all.main(["--out", str(tmp_path), "--only", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().out
