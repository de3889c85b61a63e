"""The import rules of docs/ARCHITECTURE.md: no module imports a higher layer, no import cycle.

Every ``import`` counts, at the top of a module or inside a function: a function-level import
hides a dependency, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fewbits"

#: (rank, group, module prefixes). A module may import its own group and lower ranks only;
#: groups of equal rank do not import each other. Longest prefix wins.
LAYERS = [
    (0, "math", ["fewbits._math", "fewbits._cbuild", "fewbits._version", "fewbits._io",
                     "fewbits._text"]),
    (0, "bits", ["fewbits.export.packing", "fewbits.export.huffman"]),
    (1, "kernels", ["fewbits._kernels"]),
    (1, "data", ["fewbits.data"]),
    (2, "functional", ["fewbits.functional", "fewbits.ops", "fewbits._checks"]),
    (3, "quantizers", ["fewbits.quantizers"]),
    (4, "layers", ["fewbits.layers", "fewbits.layer_kinds", "fewbits.batch_norm",
                     "fewbits.signs"]),
    (5, "config", ["fewbits.config", "fewbits._args"]),
    (5, "distributed", ["fewbits.distributed"]),
    (6, "models", ["fewbits.models"]),
    (7, "convert", ["fewbits.convert", "fewbits.hf_record"]),
    (7, "nnabla", ["fewbits.nnabla"]),
    (7, "files", ["fewbits.checkpoint", "fewbits.monitor", "fewbits.runs",
                   "fewbits.export.container", "fewbits.export._limits",
                   "fewbits.export._guard"]),
    (8, "train", ["fewbits.train"]),
    (8, "export", ["fewbits.export", "fewbits.runtime"]),
    (8, "hf", ["fewbits.hf"]),
    (9, "cli", ["fewbits.cli"]),
    (10, "facade", ["fewbits"]),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _layer(module: str) -> tuple[int, str]:
    best = max(((len(prefix), rank, group) for rank, group, prefixes in LAYERS
                for prefix in prefixes if module == prefix or module.startswith(prefix + ".")),
               default=None)
    assert best is not None, f"{module} is in no layer of LAYERS: add it (and to the docs)"
    return best[1], best[2]


def _from_target(module: str, node: ast.ImportFrom) -> str | None:
    """The fewbits module a ``from X import ...`` in ``module`` reads (relative imports
    resolved), or ``None`` for another package."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module if (node.module or "").split(".")[0] == "fewbits" else None


def _imports(module: str) -> set[str]:
    """The fewbits modules ``module`` imports (``from . import x`` -> the submodule x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fewbits"}
        elif isinstance(node, ast.ImportFrom):
            target = _from_target(module, node)
            if target is None:
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & set(MODULES)
            found |= subs or {target}
    return {m for m in found if m != module}


GRAPH = {m: _imports(m) for m in MODULES}


def upward_imports(graph: dict[str, set[str]], module: str) -> list[str]:
    """The imports of ``module`` that reach a higher rank or a sibling group."""
    rank, group = _layer(module)
    return [t for t in sorted(graph[module])
            if _layer(t)[1] != group and _layer(t)[0] >= rank]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``) of ``graph``, or ``None``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return [*path[path.index(t):], t]
            if t not in state and (found := visit(t)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_or_sibling_layer(module):
    bad = upward_imports(GRAPH, module)
    assert not bad, f"{module} {_layer(module)} imports upward or sideways: {bad}"


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None


def test_the_checker_sees_what_it_forbids():
    assert upward_imports({"fewbits.quantizers": {"fewbits.layers", "fewbits._math"}},
                          "fewbits.quantizers") == ["fewbits.layers"]
    assert upward_imports({"fewbits.train": {"fewbits.export.packed"}},
                          "fewbits.train") == ["fewbits.export.packed"]  # siblings
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert "fewbits.quantizers" in GRAPH["fewbits.layers"]  # the parser finds imports
    assert _layer("fewbits.export.onnx") == (8, "export")
    assert _layer("fewbits.export.huffman") == (0, "bits")


def test_architecture_page_names_every_layer():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for _, group, prefixes in LAYERS:
        assert f"| {group} |" in text, group
        for prefix in prefixes:
            assert f"`{prefix.removeprefix('fewbits.') or 'fewbits'}`" in text, prefix


#: The most lines a module of fewbits/ may have (issue 15: a module the next engineer can read
#: top to bottom does one job; split a longer one into a package by job).
MAX_LINES = 500
#: Exceptions: modules allowed over MAX_LINES (none today). The test below fails when a listed
#: module is short enough, so the list cannot go stale.
OVER_MAX_LINES: set[str] = set()


def test_no_module_is_over_max_lines():
    lengths = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
               for p in PKG.rglob("*.py")}
    assert "fewbits/train/run.py" in lengths  # the walk sees the modules of packages
    long = {p: n for p, n in sorted(lengths.items()) if n > MAX_LINES and p not in OVER_MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"
    stale = sorted(p for p in OVER_MAX_LINES if p in lengths and lengths[p] <= MAX_LINES)
    assert not stale, f"remove from OVER_MAX_LINES, now short enough: {stale}"


def private_uses(module: str) -> list[str]:
    """Private names (``_x``, not dunders, not modules) that ``module`` takes from another
    fewbits module: ``from .m import _x`` or ``m._x`` on an imported fewbits module."""
    tree = ast.parse(MODULES[module].read_text())
    aliases: dict[str, str] = {}  # local name -> the fewbits module it is bound to
    found = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _from_target(module, node)
            if target is None:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:
                    aliases[a.asname or a.name] = sub
                elif private(a.name) and target != module:
                    found.append(f"from {target} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in aliases and private(node.attr):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_is_used_outside_its_module(module):
    assert not private_uses(module), (
        f"{module} uses private names of other modules: {private_uses(module)}; make them "
        "public (in a private module if users should not see them)")
