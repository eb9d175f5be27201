"""The package's layout is enforced here: layers, the libraries each may use, and no import cycles.

Every import counts, those inside functions included (they hide cycles otherwise). Layers, from
the bottom up (a layer may import those below it, never those above):

    errors -> engine -> io -> {synthetic, evaluation, networks} -> training -> jobs -> {slicer, cli}

    engine      numpy/scipy only: the paper's method
    io          files, no torch
    synthetic   phantoms and simulated maps (engine, io)
    evaluation  metrics, calibration, QC pictures (engine, io)
    networks    the only torch/MONAI code besides training (engine, io)
    training    training and tuning (networks, synthetic, evaluation)
    jobs        whole command-line jobs over files (networks, evaluation)
    slicer      MRML glue and the Slicer Logic, no Qt (networks, synthetic, evaluation)
    cli         argparse: parses, calls one library function, prints
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PACKAGE

ROOT_NAME = "VertebraIDLib"

#: layer -> the layers it may import (itself included)
ALLOWED_LAYERS = {
    "base": {"base"},
    "engine": {"base", "engine"},
    "io": {"base", "engine", "io"},
    "synthetic": {"base", "engine", "io", "synthetic"},
    "evaluation": {"base", "engine", "io", "evaluation"},
    "networks": {"base", "engine", "io", "networks"},
    "training": {"base", "engine", "io", "synthetic", "evaluation", "networks", "training"},
    "jobs": {"base", "engine", "io", "evaluation", "networks", "jobs"},
    "slicer": {"base", "engine", "io", "synthetic", "evaluation", "networks", "slicer"},
    "cli": {"base", "engine", "io", "synthetic", "evaluation", "networks", "training", "jobs", "slicer", "cli"},
}

#: third-party import roots and the layers that may use them (numpy and the standard library: all)
LIBRARY_LAYERS = {
    "scipy": {"engine", "io", "synthetic", "evaluation", "networks", "training", "jobs", "slicer", "cli"},
    "torch": {"networks", "training"},
    "monai": {"networks", "training"},
    "tqdm": {"training"},
    "safetensors": {"io"},
    "nibabel": {"io"},
    "SimpleITK": {"io"},
    "matplotlib": {"evaluation"},
    "slicer": {"slicer", "cli"},
    "vtk": {"slicer"},
    "vtkmodules": {"slicer"},
    "qt": set(),  # the Logic runs without Qt; only VertebraID.py (the module file) may use it
    "ctk": set(),
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module (or package), dotted
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in the file, at any depth, resolved to absolute dotted names."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from pkg import module` imports the module itself
                candidate = f"{target}.{alias.name}"
                out.append(Import(name, candidate if candidate in modules else target, node.lineno))
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("errors",):
        return "base"
    return parts[1]


def all_imports() -> list[Import]:
    modules = package_modules()
    return [imp for name, path in sorted(modules.items()) for imp in imports_of(name, path, modules)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def internal_edges(imports: list[Import]) -> dict[str, set[str]]:
    modules = package_modules()
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target.split(".")[0] == ROOT_NAME and imp.target in modules and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    return edges


# --------------------------------------------------------------------------- the contracts


def test_every_module_sits_in_a_known_layer():
    unknown = sorted({layer_of(m) for m in package_modules()} - set(ALLOWED_LAYERS))
    assert not unknown, f"modules outside the layers: {unknown}"


@pytest.mark.slow
def test_layers_import_only_downwards():
    wrong = [f"{i.source}:{i.line} imports {i.target}" for i in all_imports()
             if i.target.split(".")[0] == ROOT_NAME and layer_of(i.target) not in ALLOWED_LAYERS[layer_of(i.source)]]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_each_library_only_where_it_belongs():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = []
    for imp in all_imports():
        root = imp.target.split(".")[0]
        if root in (ROOT_NAME, "numpy") or root in stdlib:
            continue
        layer = layer_of(imp.source)
        allowed = LIBRARY_LAYERS.get(root)
        if allowed is None:
            wrong.append(f"{imp.source}:{imp.line} imports {imp.target}, a library the layers do not list")
        elif layer not in allowed:
            wrong.append(f"{imp.source}:{imp.line} ({layer}) imports {imp.target}")
    assert not wrong, "libraries outside their layers:\n" + "\n".join(wrong)


@pytest.mark.slow
def test_no_import_cycles_counting_imports_inside_functions():
    found = cycles(internal_edges(all_imports()))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


# --------------------------------------------------------------------------- the checker itself


def test_the_checker_sees_imports_inside_functions_and_cycles(tmp_path, monkeypatch):
    """A nested import is found, resolved and counted; a cycle through it is reported."""
    package = tmp_path / ROOT_NAME
    (package / "engine").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engine" / "__init__.py").write_text("")
    (package / "engine" / "a.py").write_text("def f():\n    from .b import g\n    import torch\n")
    (package / "engine" / "b.py").write_text("from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    imports = all_imports()
    assert Import("VertebraIDLib.engine.a", "VertebraIDLib.engine.b", 2) in imports
    assert Import("VertebraIDLib.engine.b", "VertebraIDLib.engine.a", 1) in imports
    assert cycles(internal_edges(imports)) == [["VertebraIDLib.engine.a", "VertebraIDLib.engine.b"]]
    with pytest.raises(AssertionError, match="engine.a:3 \\(engine\\) imports torch"):
        test_each_library_only_where_it_belongs()
