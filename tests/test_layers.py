"""Imports point down: every module of ``src/siteadapt`` belongs to a layer (README, "Layers"), and may import only
modules of its own layer or lower ones, with no import cycle between modules.

The scan is static (``ast``): every ``import`` and ``from ... import`` anywhere in a file counts, the ones inside
functions included (a lazy import is still a dependency). ``from pkg import name`` counts as importing the module
``pkg.name`` when that is a module, else the package ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "siteadapt"

# lowest first; a module's layer is that of the longest prefix listed
LAYERS: list[tuple[str, ...]] = [
    ("siteadapt", "siteadapt.errors", "siteadapt.redact"),
    ("siteadapt.config",),
    ("siteadapt.io", "siteadapt.data", "siteadapt.metrics", "siteadapt.nn", "siteadapt.postprocess",
     "siteadapt.storage", "siteadapt.figures"),
    ("siteadapt.layout",),
    ("siteadapt.methods",),
    ("siteadapt.train",),
    ("siteadapt.tracking", "siteadapt.dvcgen"),
    ("siteadapt.registry", "siteadapt.pyfunc_model", "siteadapt.pyfunc_classifier"),
    ("siteadapt.steps",),
    ("siteadapt.kfp",),
    ("siteadapt.cli", "siteadapt.__main__"),
]


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def layer_of(module: str) -> int | None:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and n.count(".") > depth:
                best, depth = i, n.count(".")
    return best


def imports(module: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file."""
    is_pkg = file.name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:  # ``import a.b.c`` of a name inside a module: its module
                n = n.rpartition(".")[0]
            if n and n != module and n.split(".")[0] == PACKAGE:
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, f, known) for m, f in known.items()}


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) is None]
    assert not missing, f"modules without a layer (add them to LAYERS and the README's layering): {missing}"


def test_imports_point_down():
    upward = []
    for m, deps in graph().items():
        lm = layer_of(m)
        for d in sorted(deps):
            ld = layer_of(d)
            if lm is not None and ld is not None and ld > lm:
                upward.append(f"{m} (layer {lm}) imports {d} (layer {ld})")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles between modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_check_sees_lazy_upward_imports(tmp_path):
    """The scan itself: an import inside a function is found, and a layer above is reported."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..steps import api\n    return api\n")
    known = {"siteadapt.methods.build": f, "siteadapt.steps": f, "siteadapt.steps.api": f}
    assert imports("siteadapt.methods.build", f, known) == {"siteadapt.steps.api"}
    assert layer_of("siteadapt.steps.api") > layer_of("siteadapt.methods.build")
    g = graph()
    assert "siteadapt.tracking" in g["siteadapt.steps.api"]  # function-level imports of the real tree are seen
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
