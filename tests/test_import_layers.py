"""The import rule: core <- methods <- app, one way, no cycle, no hidden imports inside functions.

Reads every module of ``src/bkdattr`` with :mod:`ast` (no bkdattr or torch import). A core module
(``bkdattr.core``) imports only core; a method package imports core and the methods ``METHOD_DEPS`` lists for it;
the app (``bkdattr.app``) imports anything. No cycle among bkdattr's modules, whether the edge is at the top of a
module, inside a function or under ``if TYPE_CHECKING:``. Outside the CLI modules (where a lazy import keeps a
command fast to start) an import inside a function is allowed only for an optional or heavy dependency and says
why on its line or the line above (``# lazy: <why>``); a bkdattr module imported that way must also be listed in
``LAZY_ALLOWED``, and a standard-library import never sits inside a function.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "bkdattr"

# method -> the methods it may import (docs/ARCHITECTURE.md, "Layers")
METHOD_DEPS: dict[str, frozenset[str]] = {
    "inject": frozenset(),
    "probe": frozenset({"inject"}),
    "attribution": frozenset({"inject"}),
    "control": frozenset({"inject", "attribution"}),
    "audit": frozenset({"inject"}),
    "scan": frozenset({"inject", "audit"}),
    "disarm": frozenset({"inject", "probe", "control", "audit", "scan"}),
}

# (importing module, imported module or "*") -> why the import sits inside a function
LAZY_ALLOWED: dict[tuple[str, str], str] = {
    ("bkdattr", "*"): "the package face resolves its public names on first use, so `import bkdattr` loads no torch",
}
MAX_LAZY_ALLOWED = 20
LAZY_MARK = "# lazy:"



@dataclass(frozen=True)
class Edge:
    src: str            # importing module
    dst: str            # imported bkdattr module (a package stands for its __init__)
    path: str           # file of the importing module, relative to the source root
    line: int
    names: tuple[str, ...]
    in_function: bool
    commented: bool     # "# lazy:" on the import's line or the line above


@dataclass(frozen=True)
class Finding:
    kind: str   # upward, method, outside, cycle, lazy, lazy-third-party, stdlib-in-function, dynamic, allow-list
    path: str
    line: int
    message: str
    key: tuple[str, str, str] = ("", "", "")

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.message}"


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)   # per-import findings (not layer ones)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(mod: str, names: list[str], modules: dict[str, Path]) -> list[tuple[str, tuple[str, ...]]]:
    """``from mod import names`` -> the bkdattr modules it loads: a name that is a submodule is one target."""
    out: dict[str, list[str]] = {}
    for n in names:
        target = f"{mod}.{n}" if f"{mod}.{n}" in modules else mod
        out.setdefault(target, []).append(n)
    return [(t, tuple(ns)) for t, ns in out.items()]


def _existing(mod: str, modules: dict[str, Path]) -> str:
    """The longest prefix of a dotted name that is a module (``import bkdattr.x.y`` loads ``bkdattr.x.y``)."""
    while mod not in modules and "." in mod:
        mod = mod.rsplit(".", 1)[0]
    return mod


def read_graph(root: Path, package: str = PACKAGE) -> Graph:
    """Every import of every module under ``root/package`` (``root`` is the source root)."""
    g = Graph()
    for p in sorted((root / package).rglob("*.py")):
        g.modules[module_name(root, p)] = p
    stdlib = set(sys.stdlib_module_names)
    for name, p in g.modules.items():
        text = p.read_text()
        lines = text.splitlines()
        rel = str(p.relative_to(root))
        is_pkg = p.name == "__init__.py"
        base_pkg = name if is_pkg else name.rsplit(".", 1)[0]

        def commented(line: int, lines: list[str] = lines) -> bool:
            return any(LAZY_MARK in lines[i - 1] for i in (line, line - 1) if 1 <= i <= len(lines))

        def visit(node: ast.AST, in_fn: bool, name: str = name, rel: str = rel, base_pkg: str = base_pkg,
                  commented=commented) -> None:
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets: list[tuple[str, tuple[str, ...]]] = []
                external: list[str] = []
                if isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name == package or a.name.startswith(package + "."):
                            targets.append((_existing(a.name, g.modules), ()))
                        else:
                            external.append(a.name.split(".")[0])
                else:
                    names = [a.name for a in node.names]
                    if node.level:
                        parts = base_pkg.split(".")
                        up = parts[: len(parts) - (node.level - 1)]
                        mod = ".".join(up + ([node.module] if node.module else []))
                        targets = _resolve(_existing(mod, g.modules), names, g.modules) if node.module else \
                            _resolve(mod, names, g.modules)
                    elif node.module and (node.module == package or node.module.startswith(package + ".")):
                        targets = _resolve(_existing(node.module, g.modules), names, g.modules)
                    elif node.module and node.module != "__future__":
                        external.append(node.module.split(".")[0])
                has_mark = commented(node.lineno)
                for dst, ns in targets:
                    g.edges.append(Edge(name, dst, rel, node.lineno, ns, in_fn, has_mark))
                if in_fn:
                    for ext in external:
                        if ext in stdlib:
                            g.findings.append(Finding("stdlib-in-function", rel, node.lineno,
                                                      f"imports {ext} (stdlib) inside a function: move it to the top",
                                                      ("stdlib-in-function", name, ext)))
                        elif not has_mark:
                            g.findings.append(Finding("lazy-third-party", rel, node.lineno,
                                                      f"imports {ext} inside a function without '{LAZY_MARK} <why>':"
                                                      " move it to the top or say why it is lazy",
                                                      ("lazy-third-party", name, ext)))
                return
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if called in ("import_module", "__import__"):
                    what = "importlib.import_module" if called == "import_module" else "__import__"
                    g.findings.append(Finding("dynamic", rel, node.lineno,
                                              f"imports by name ({what}): import the module and refer to it",
                                              ("dynamic", name, what)))
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, in_fn)     # a TYPE_CHECKING import states a dependency: counted as top level
                for child in node.orelse:
                    visit(child, in_fn)
                return
            inner = in_fn or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(ast.parse(text, filename=str(p)), False)
    return g


def layer_of(mod: str, package: str = PACKAGE) -> str | None:
    """``root``, ``core``, ``app``, a method's name, or None (outside the three layers)."""
    if mod == package:
        return "root"
    top = mod[len(package) + 1:].split(".")[0]
    if top in ("core", "app"):
        return top
    if top in METHOD_DEPS:
        return top
    return None


def is_cli(mod: str, package: str = PACKAGE) -> bool:
    """The CLI modules, where a lazy import keeps a command fast to start."""
    return mod == f"{package}.app.cli" or mod.startswith(f"{package}.app.commands.")


def _sccs(nodes: list[str], adj: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(adj.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(adj.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _cycle_in(comp: list[str], adj: dict[str, set[str]]) -> list[str]:
    """One cycle through the component's first module: ``[a, b, ..., a]``."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(adj.get(v, ()) & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start, start]


def check(root: Path, package: str = PACKAGE, *, lazy_allowed: dict[tuple[str, str], str] | None = None
          ) -> tuple[list[Finding], Graph]:
    """Every finding of the import rule under ``root/package``, one line each, and the graph read."""
    allowed = LAZY_ALLOWED if lazy_allowed is None else lazy_allowed
    g = read_graph(root, package)
    out: list[Finding] = []
    for mod, p in g.modules.items():
        if layer_of(mod, package) is None:
            out.append(Finding("outside", str(p.relative_to(root)), 1,
                               f"{mod} is outside the three layers: move it under core/, app/ or a method package",
                               ("outside", mod, "")))
    used: set[tuple[str, str]] = set()
    for e in g.edges:
        src, dst = layer_of(e.src, package), layer_of(e.dst, package)
        what = f"imports {e.dst} ({dst}) from {e.src} ({src})"
        if src is not None and dst is not None and dst != "root" and src != "app" and src != dst:
            if src == "core" or dst == "app" or (src == "root" and not e.in_function):
                out.append(Finding("upward", e.path, e.line, f"{what}: move the imported code down or this code up",
                                   ("upward", e.src, e.dst)))
            elif src in METHOD_DEPS and dst in METHOD_DEPS and dst not in METHOD_DEPS[src]:
                kind = "upward" if src in METHOD_DEPS.get(dst, ()) else "method"
                out.append(Finding(kind, e.path, e.line,
                                   f"{what}: {src} may import {sorted(METHOD_DEPS[src]) or 'no method'}; move the "
                                   "shared code to core or to a method both may import", (kind, e.src, e.dst)))
        if e.in_function and not is_cli(e.src, package):
            key = next((k for k in ((e.src, e.dst), (e.src, "*")) if k in allowed), None)
            if key is not None:
                used.add(key)
            if key is None or not e.commented:
                why = "not in LAZY_ALLOWED" if key is None else f"without '{LAZY_MARK} <why>'"
                out.append(Finding("lazy", e.path, e.line, f"{what} inside a function, {why}: move it to the top",
                                   ("lazy", e.src, e.dst)))
    for f in g.findings:
        if f.kind == "dynamic" and (f.key[1], "*") in allowed:
            used.add((f.key[1], "*"))
            continue
        mod = f.key[1]
        if f.kind in ("lazy-third-party", "stdlib-in-function") and is_cli(mod, package):
            continue
        out.append(f)
    # cycles: every edge except the package face's lazy ones
    adj: dict[str, set[str]] = {}
    names: dict[tuple[str, str], Edge] = {}
    for e in g.edges:
        if e.src == package and e.in_function:
            continue
        if e.src != e.dst:
            adj.setdefault(e.src, set()).add(e.dst)
            names.setdefault((e.src, e.dst), e)
    for comp in _sccs(sorted(g.modules), adj):
        cyc = _cycle_in(comp, adj)
        first = names[(cyc[0], cyc[1])]
        ties = "; ".join(f"{a} -> {b} ({', '.join(names[(a, b)].names) or 'module'}, line {names[(a, b)].line})"
                         for a, b in zip(cyc, cyc[1:], strict=False))
        out.append(Finding("cycle", first.path, first.line,
                           f"cycle {' -> '.join(cyc)}: {ties}; break one tie (move the shared code down)",
                           ("cycle", comp[0], " ".join(comp[1:]))))
    if len(allowed) > MAX_LAZY_ALLOWED:
        out.append(Finding("allow-list", "LAZY_ALLOWED", 0, f"{len(allowed)} entries, at most {MAX_LAZY_ALLOWED}"))
    for k in allowed:
        if k not in used:
            out.append(Finding("allow-list", "LAZY_ALLOWED", 0, f"entry {k} matches no import: remove it",
                               ("allow-list", *k)))
    return out, g


def lazy_count(g: Graph, package: str = PACKAGE) -> int:
    """Imports of bkdattr modules inside functions outside the CLI modules (statements, not names)."""
    return len({(e.path, e.line) for e in g.edges if e.in_function and e.src != package
                and not is_cli(e.src, package)})


# ---------------------------------------------------------------- the rule on the package


def test_import_layers():
    findings, g = check(SRC)
    assert not findings, "import rule broken:\n" + "\n".join(map(str, findings))
    assert lazy_count(g) <= MAX_LAZY_ALLOWED


# ---------------------------------------------------------------- the checker on a synthetic tree


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in [p for p in (root / "pkg").rglob("*") if p.is_dir()] + [root / "pkg"]:
        (d / "__init__.py").touch()
    return root


def _lines(findings: list[Finding]) -> set[tuple[str, str, int]]:
    return {(f.kind, f.path, f.line) for f in findings}


@pytest.fixture
def synthetic(tmp_path):
    return _tree(tmp_path, {
        "core/base.py": "import os\n\nX = 1\n",
        "core/up.py": "from pkg.app.main import run\n",                              # core -> app, line 1
        "inject/data.py": "from ..core.base import X\n",
        "probe/a.py": "from ..inject.data import X\nfrom ..scan import s\n",         # probe -> scan, line 2
        "scan/s.py": "def f():\n    from ..scan import t\n",                        # lazy, no comment, line 2
        "scan/t.py": "from . import s\n\n\ndef g():\n    # lazy: heavy\n    from ..inject import data\n"
                     "    import json\n    import numpy\n",                         # stdlib 7, third-party 8
        "app/main.py": "import importlib\n\n\ndef run():\n    return importlib.import_module('pkg.scan')\n",
        "app/commands/cmd.py": "def c():\n    from ..main import run\n    import json\n",  # CLI: allowed
        "misc.py": "\n",                                                             # outside the layers
    })


def test_checker_finds_each_break_on_its_line(synthetic):
    allowed = {("pkg.scan.t", "pkg.inject.data"): "heavy", ("pkg.audit.x", "*"): "stale"}
    findings, g = check(synthetic, "pkg", lazy_allowed=allowed)
    got = _lines(findings)
    assert ("upward", "pkg/core/up.py", 1) in got
    assert ("method", "pkg/probe/a.py", 2) in got
    assert ("lazy", "pkg/scan/s.py", 2) in got                 # no comment and not allowed
    assert ("cycle", "pkg/scan/s.py", 2) in got                # s -> t (in a function) -> s
    assert ("stdlib-in-function", "pkg/scan/t.py", 7) in got
    assert ("lazy-third-party", "pkg/scan/t.py", 8) in got
    assert ("dynamic", "pkg/app/main.py", 5) in got
    assert ("outside", "pkg/misc.py", 1) in got
    assert any(f.kind == "allow-list" and "pkg.audit.x" in f.message for f in findings)
    # the allowed, commented lazy import and the CLI module's imports are no findings
    assert not any(f.path == "pkg/scan/t.py" and f.line == 6 for f in findings)
    assert not any(f.path.startswith("pkg/app/commands") for f in findings)
    assert len(findings) == 9, "\n".join(map(str, findings))
    assert lazy_count(g, "pkg") == 2
    cyc = next(f for f in findings if f.kind == "cycle")
    assert "pkg.scan.s -> pkg.scan.t -> pkg.scan.s" in cyc.message


def test_checker_comment_alone_is_not_enough(synthetic):
    (synthetic / "pkg" / "scan" / "s.py").write_text("def f():\n    from ..scan import t  # lazy: cycle\n")
    findings, _ = check(synthetic, "pkg", lazy_allowed={})
    assert ("lazy", "pkg/scan/s.py", 2) in _lines(findings)
    findings, _ = check(synthetic, "pkg", lazy_allowed={("pkg.scan.s", "pkg.scan.t"): "why"})
    assert ("lazy", "pkg/scan/s.py", 2) not in _lines(findings)


def test_checker_type_checking_and_relative_package_imports(tmp_path):
    root = _tree(tmp_path, {
        "inject/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "inject/b.py": "from . import a\n",
        "core/c.py": "from .. import inject\n",             # the package: carries inject/__init__'s imports
    })
    findings, g = check(root, "pkg", lazy_allowed={})
    assert ("cycle", "pkg/inject/a.py", 3) in _lines(findings)
    assert ("upward", "pkg/core/c.py", 1) in _lines(findings)
    assert {(e.src, e.dst) for e in g.edges} == {("pkg.inject.a", "pkg.inject.b"), ("pkg.inject.b", "pkg.inject.a"),
                                                 ("pkg.core.c", "pkg.inject")}
