"""Safe loading: nothing from disk is unpickled, evaluated or run, remote code needs the user's flag, config
paths are only paths, and stale or foreign artifacts are refused with a one-line ArtifactError.

The source scan parses every module of ``src/bkdattr`` (so docstrings that *mention* pickle do not count) and
flags: imports of pickle-like modules, the builtins ``eval``/``exec``/``compile``/``__import__``,
``torch.load`` without ``weights_only=True``, ``numpy.load`` without ``allow_pickle=False``, unsafe YAML
loaders, ``trust_remote_code=True`` (as a keyword, a dict entry or a parameter default) and ``shell=True``.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bkdattr.app.cli import main
from bkdattr.core.errors import ArtifactError, InputFileError
from bkdattr.core.io import check_metadata, load_npz, load_tensors, save_npz, save_tensors
from tiny_runs import make_run, save_tiny

pytestmark = pytest.mark.usefixtures("no_progress_bars")

SRC = Path(__file__).resolve().parents[1] / "src" / "bkdattr"
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "pickletools"}
BUILTINS = {"eval", "exec", "compile", "__import__"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _assigned(tree: ast.Module) -> dict[str, ast.AST]:
    return {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    """``file:line: what`` for every unguarded unsafe construct in ``source`` (see the module docstring)."""
    out = []
    tree = ast.parse(source, filename)
    names = _assigned(tree)
    for n in tree.body:  # a CLI option imported from another module (``from ..cli_options import TRUST``)
        if isinstance(n, ast.ImportFrom) and n.level and filename.startswith("bkdattr/"):
            base = Path(filename).parents[n.level - 1]
            sibling = SRC.parent / base / f"{(n.module or '').replace('.', '/')}.py"
            if sibling.is_file():
                shared = _assigned(ast.parse(sibling.read_text()))
                names.update({a.asname or a.name: shared[a.name] for a in n.names if a.name in shared})

    def off(default: ast.AST) -> bool:  # False, or a CLI option (possibly named) whose default is False
        default = names.get(default.id, default) if isinstance(default, ast.Name) else default
        if isinstance(default, ast.Call) and _dotted(default.func).endswith("Option") and default.args:
            default = default.args[0]
        return _is_const(default, False)

    for node in ast.walk(tree):
        line = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            out.append(f"{line}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if isinstance(node.func, ast.Name) and name in BUILTINS:
                out.append(f"{line}: {name}()")
            if name.endswith("torch.load") and not _is_const(_kw(node, "weights_only"), True):
                out.append(f"{line}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and not _is_const(_kw(node, "allow_pickle"), False):
                out.append(f"{line}: {name} without allow_pickle=False")
            if name.split(".")[-1] in ("read_pickle", "unsafe_load", "full_load") or (
                    name == "yaml.load" and "SafeLoader" not in ast.unparse(node)):
                out.append(f"{line}: {name}")
            if _is_const(_kw(node, "trust_remote_code"), True):
                out.append(f"{line}: trust_remote_code=True")
            if _is_const(_kw(node, "shell"), True):
                out.append(f"{line}: shell=True")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if _is_const(v, True) and isinstance(k, ast.Constant) and k.value == "trust_remote_code":
                    out.append(f"{line}: {{'trust_remote_code': True}}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            pos = args.posonlyargs + args.args
            pairs = list(zip(pos[len(pos) - len(args.defaults):], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            out += [f"{line}: {node.name}(trust_remote_code=True)" for a, d in pairs
                    if a.arg == "trust_remote_code" and not off(d)]
    return out


def test_scanner_flags_each_unsafe_construct():
    bad = """
import pickle
from dill import loads
import torch, numpy as np, yaml, subprocess
x = eval("1")
exec("y = 1")
torch.load("f.pt")
torch.load("f.pt", weights_only=False)
np.load("a.npy")
yaml.load(open("c.yaml"))
AutoModel.from_pretrained("m", trust_remote_code=True)
kw = {"trust_remote_code": True}
subprocess.run("ls", shell=True)
def load(spec, trust_remote_code=True): ...
"""
    found = unsafe_uses(bad)
    assert len(found) == 12, found
    good = """
import torch, numpy as np, yaml
model.eval()
torch.load("f.pt", weights_only=True)
np.load("a.npz", allow_pickle=False)
yaml.safe_load("a: 1")
AutoModel.from_pretrained("m", trust_remote_code=flag)
def load(spec, trust_remote_code: bool = False): ...
Trust = typer.Option(False, "--trust-remote-code")
def info(trust_remote_code: bool = Trust, other: bool = typer.Option(False)): ...
"""
    assert unsafe_uses(good) == []
    assert len(unsafe_uses("Trust = typer.Option(True)\ndef info(trust_remote_code: bool = Trust): ...")) == 1


def test_package_source_has_no_unsafe_loading():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    found = [hit for f in files for hit in unsafe_uses(f.read_text(), str(f.relative_to(SRC.parent)))]
    assert found == []


def test_grep_of_the_issue_finds_only_prose():
    """``grep -rn "pickle\\|trust_remote_code=True" src/`` matches only prose: every code token naming pickle is
    the ``allow_pickle`` keyword (set to False, checked above); the rest are docstrings and comments."""
    import io
    import tokenize

    hits = [(f, i) for f in sorted(SRC.rglob("*.py")) for i, ln in enumerate(f.read_text().splitlines(), 1)
            if re.search(r"pickle|trust_remote_code=True", ln)]
    assert hits  # the docstrings that promise "no pickle" are found, so the grep itself works
    for f in {f for f, _ in hits}:
        for tok in tokenize.generate_tokens(io.StringIO(f.read_text()).readline):
            if tok.type == tokenize.NAME and "pickle" in tok.string:
                assert tok.string == "allow_pickle", f"{f}:{tok.start[0]}"
            if tok.type == tokenize.NAME and tok.string == "trust_remote_code":
                line = tok.line[tok.end[1]:].replace(" ", "")
                assert not line.startswith(("=True", ":bool=True")), f"{f}:{tok.start[0]}"


# ---- remote code -------------------------------------------------------------------------------------------
def _evil_model(folder: Path, marker_dir: Path) -> Path:
    """A model folder whose config asks for custom code; importing any of its modules touches a marker file."""
    folder.mkdir()
    tiny = save_tiny(folder.parent / "tiny_for_tok")
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    for mod in ("configuration_evil", "modeling_evil"):
        (folder / f"{mod}.py").write_text(f"import pathlib\npathlib.Path({str(marker_dir / mod)!r}).touch()\n")
    return folder


def test_custom_code_is_refused_without_the_flag_and_never_imported(tmp_path, capsys):
    evil = _evil_model(tmp_path / "evil", tmp_path)
    assert main(["info", "--model", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: model '{evil}' needs custom code; review it, then pass " \
                                           "--trust-remote-code"
    assert not list(tmp_path.glob("*_evil"))  # no module of the folder ran


def test_trust_remote_code_comes_only_from_the_user_flag(tmp_path, monkeypatch):
    import transformers

    folder = save_tiny(tmp_path / "tiny")
    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained

        def fake(*a, _real=real, _name=cls.__name__, **k):
            seen.append((_name, k.get("trust_remote_code")))
            return _real(*a, **k)

        monkeypatch.setattr(cls, "from_pretrained", fake)
    assert main(["info", "--model", str(folder)]) == 0
    assert seen == [("AutoTokenizer", False), ("AutoModelForCausalLM", False)]
    seen.clear()
    assert main(["info", "--model", str(folder), "--trust-remote-code"]) == 0
    assert seen == [("AutoTokenizer", True), ("AutoModelForCausalLM", True)]


# ---- configs are data ----------------------------------------------------------------------------------------
def test_config_files_and_overrides_are_never_executed(tmp_path, capsys):
    from bkdattr.app.pipeline import load_config

    marker = tmp_path / "PWNED"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    yml = tmp_path / "evil.yaml"
    yml.write_text(f"model: {tag}\n")
    assert main(["run", str(yml)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {yml}: invalid YAML at line 1 (could not determine a "
                                              "constructor for the tag 'tag:yaml.org,2002:python/object/apply")
    py = tmp_path / "config.py"  # a Python file is read as YAML text, not imported
    py.write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    assert main(["run", str(py)]) == 2
    assert capsys.readouterr().err == f"error: {py}: the config must be a mapping of options\n"
    cfg = load_config(None, [f"model={tag}", "out=~/runs/x"])  # an override value that is not YAML stays text
    assert cfg.model == tag
    assert cfg.out == str(Path.home() / "runs" / "x")  # '~' resolved as a path
    assert not marker.exists()


# ---- stale, foreign or corrupt artifacts -----------------------------------------------------------------------
def test_wrong_shape_and_corrupt_safetensors_are_refused(tmp_path):
    p = tmp_path / "abar.safetensors"
    save_tensors(p, {"abar": torch.zeros(2, 4, 64)})
    with pytest.raises(ArtifactError, match=r"tensor 'abar' has shape \(2, 4, 64\), expected \(30, 9, 576\); it "
                                            "belongs to another model or config, delete it and rerun"):
        load_tensors(p, expect={"abar": (30, 9, 576)})
    with pytest.raises(ArtifactError, match="tensor 'features' missing"):
        load_tensors(p, expect={"features": (1,)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_tensors(cut)
    with pytest.raises(InputFileError, match="file not found"):
        load_tensors(tmp_path / "nope.safetensors")


def test_config_hash_mismatch_is_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    save_tensors(p, {"t": torch.ones(1)}, metadata={"key": "aaaa", "kind": "attn_input"})
    assert check_metadata(p, {"key": "aaaa"})["kind"] == "attn_input"
    with pytest.raises(ArtifactError, match=r"was written for other inputs \(key 'aaaa', expected 'bbbb'\); it is "
                                            "stale or foreign"):
        check_metadata(p, {"key": "bbbb"})


def test_foreign_feature_cache_is_refused(tmp_path):
    """A features file of another model copied under the name this model's cache expects is not used."""
    from bkdattr.probe.features import cached_features
    from tiny import make_tiny

    a, b = make_tiny("llama", seed=0), make_tiny("llama", seed=1)
    texts = ["Name a colour.", "Name a fruit."]
    _f, path_a, hit = cached_features(a, texts, tmp_path / "a", tag="m")
    assert not hit
    _f, path_b, _hit = cached_features(b, texts, tmp_path / "b", tag="m")
    assert path_a.name != path_b.name  # the cache key (model fingerprint, texts, kind, layers) is in the name
    path_b.write_bytes(path_a.read_bytes())  # same shape, other model
    with pytest.raises(ArtifactError, match="was written for other inputs"):
        cached_features(b, texts, tmp_path / "b", tag="m")


def test_pickled_npz_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "probe_svm.npz"
    np.savez(evil, sv=np.array([Evil()], dtype=object))
    with pytest.raises(ArtifactError, match="not a plain numpy npz file .*bkdattr never unpickles"):
        load_npz(evil)
    assert not marker.exists()
    ok = tmp_path / "ok.npz"
    save_npz(ok, a=np.arange(3))
    assert load_npz(ok)["a"].tolist() == [0, 1, 2]


def test_foreign_abar_is_refused_by_the_vector_stage(tmp_path, capsys):
    """``bkdattr vector --set means=attribution`` with BAHA means of another model: one line, exit 2."""
    run = make_run(tmp_path / "run", ranking=True)
    save_tensors(run.path / "attribution" / "abar.safetensors", {"abar": torch.zeros(3, 4, 64)})
    capsys.readouterr()
    rc = main(["vector", "--run", str(run.path), "--set", "means=attribution", "--n-prompts", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err == (f"error: {run.path}/attribution/abar.safetensors: tensor 'abar' has shape (3, 4, 64), expected "
                   "(2, 4, 64); it belongs to another model or config, delete it and rerun\n")
