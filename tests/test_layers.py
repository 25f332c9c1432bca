"""The import rules of docs/design.md ("What each layer may import"), checked on the source.

Each top-level module or package of ``dils_search`` is a layer. A layer may import only the
layers listed for it (module-level and function-level imports alike), and never the third-party
packages listed as forbidden for it. Private Optuna/Ray internals are reached only through
``search/_optuna_compat.py``. No module is over 450 lines, and nothing cites a file outside the
repository.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dils_search"

#: layer -> the dils_search layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "registry": {"errors"},
    "progress": set(),
    "core": {"errors", "registry"},
    "config": {"core", "errors", "registry"},
    "store": {"core", "errors", "registry"},
    "search": {"core", "config", "store", "errors", "registry", "progress"},
    "report": {"core", "config", "store", "search", "errors", "registry", "progress"},
    "cli": {"core", "config", "store", "search", "report", "errors", "registry", "progress"},
    "__init__": {"core", "config", "store", "errors", "registry", "search"},  # search: the plugin API (search/tree.py)
    "__main__": {"cli"},
}
#: layer -> third-party packages it must not import
FORBIDDEN: dict[str, set[str]] = {
    "errors": {"torch", "numpy", "optuna", "ray", "sqlalchemy", "plotly", "tqdm"},
    "registry": {"torch", "numpy", "optuna", "ray", "sqlalchemy", "plotly", "tqdm"},
    "core": {"optuna", "ray", "sqlalchemy", "plotly", "tqdm"},
    "config": {"torch", "numpy", "optuna", "ray", "sqlalchemy", "plotly"},
    "store": {"optuna", "ray", "plotly"},
    "search": {"plotly"},
    "report": {"ray"},
    "__init__": {"torch", "numpy", "optuna", "ray", "sqlalchemy", "plotly"},
}
#: attributes of Optuna/Ray internals; only the compat module may touch them
PRIVATE_ATTRS = {"_storage", "_study_id", "_backend", "_set_trial_attr_without_commit", "_create_scoped_session",
                 "_cached_frozen_trial", "_raylet"}
COMPAT = PACKAGE / "search" / "_optuna_compat.py"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _module(path: Path) -> tuple[str, str]:
    """(dotted name of the package the file's relative imports resolve against, its layer)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1]
    layer = parts[1] if len(parts) > 1 else "__init__"
    return ".".join(package), layer


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every imported module name (relative imports resolved) with its line."""
    package, _ = _module(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` may name a submodule: count it as that layer
                names = [f"{name}.{a.name}" for a in node.names] if not node.module else [name]
                out += [(n, node.lineno) for n in names]
            else:
                out.append((node.module or "", node.lineno))
    return out


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_layer_imports_only_what_design_allows(path: Path) -> None:
    _, layer = _module(path)
    assert layer in ALLOWED or path.parent.name == "dils_search", f"{path}: layer {layer!r} is not in docs/design.md"
    allowed = ALLOWED.get(layer, set()) | {layer}
    forbidden = FORBIDDEN.get(layer, set())
    for name, line in _imports(path):
        where = f"{path.relative_to(ROOT)}:{line} imports {name}"
        if name == "dils_search" or name.startswith("dils_search."):
            target = _layer_of(name)
            if name == "dils_search" and layer != "__init__":
                target = "__init__"
            assert target in allowed, f"{where}: layer {layer!r} may import only {sorted(allowed)}"
        else:
            assert name.split(".")[0] not in forbidden, f"{where}: layer {layer!r} must not import {name.split('.')[0]}"
        if name.startswith(("optuna.", "ray.")) and any(p.startswith("_") for p in name.split(".")):
            assert path == COMPAT, f"{where}: private Optuna/Ray modules are reached only through search/_optuna_compat.py"


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_private_optuna_and_ray_internals_only_in_compat(path: Path) -> None:
    if path == COMPAT:
        return
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRS:
            pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}; go through search/_optuna_compat.py")


def test_layer_graph_has_no_cycles() -> None:
    """The allowed-import table itself is a DAG (so the package's layers are too)."""
    seen: dict[str, int] = {}

    def visit(layer: str, stack: tuple[str, ...]) -> None:
        assert layer not in stack, f"cycle: {' -> '.join((*stack, layer))}"
        if seen.get(layer):
            return
        for dep in ALLOWED.get(layer, set()):
            visit(dep, (*stack, layer))
        seen[layer] = 1

    for layer in ALLOWED:
        visit(layer, ())


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_no_module_over_450_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 450, f"{path.relative_to(ROOT)} has {lines} lines; split it (docs/design.md, 'Layout')"


def test_nothing_cites_a_file_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = ["DESIGN" + ".md", "../" + "shared", "STYLE" + ".md"]
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".toml", ".ini", ".cfg", ".txt", ""} or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        hits += [f"{name}: {o}" for o in outside if o in text]
    assert not hits, hits


def test_design_doc_lists_every_layer() -> None:
    text = (ROOT / "docs" / "design.md").read_text()
    layers = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
              if (p.suffix == ".py" or (p / "__init__.py").exists()) and not p.name.startswith("__")}
    missing = [layer for layer in layers if f"`{layer}" not in text]
    assert not missing, f"docs/design.md does not describe {missing}"
