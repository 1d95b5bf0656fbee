"""The map of apps/medsam2: every folder and loose module of ``lib`` (and ``main.py``) is a named layer, each
layer imports only the layers its entry below names, the SAM2 engine, imaging, training and settings import no
web server (MONAI Label, FastAPI, Starlette), and no two modules of ``lib`` import each other, directly or
around a loop (imports inside functions and under ``TYPE_CHECKING`` count too). Why the layers are cut this way:
docs/layers.md."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import networkx as nx
import pytest

from sam2_testing import APP_DIR

LIB = APP_DIR / "lib"
MAIN = APP_DIR / "main.py"
WEB = ("monailabel", "fastapi", "starlette", "uvicorn")
FOUNDATION = {"errors", "atomic_files", "log_identifiers"}
# layer -> the layers it may import (besides itself), written once; lowest first
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "atomic_files": set(),
    "log_identifiers": set(),
    "imaging": {"errors", "atomic_files"},
    "engine": {"errors", "atomic_files", "imaging"},
    "training": {"errors", "atomic_files", "imaging", "engine"},
    "storage": {"errors", "atomic_files", "imaging", "log_identifiers"},
    "settings": {"errors", "engine", "training"},
    "server": FOUNDATION | {"settings", "storage", "training", "engine"},
    "infers": {"errors", "imaging", "engine", "storage"},
    "trainers": {"errors", "atomic_files", "engine", "training"},
    "activelearning": {"errors", "engine"},
    "configs": {"errors", "engine", "settings", "server", "infers", "trainers", "activelearning"},
    "main": {"training", "storage", "settings", "server", "configs"},
}
PURE = ("errors", "atomic_files", "log_identifiers", "imaging", "engine", "training", "settings")


def layer_of(path: Path) -> str:
    return "main" if path == MAIN else path.relative_to(LIB).parts[0].removesuffix(".py")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, those inside functions too; relative ones as '.name';
    ``from package import name`` as 'package.name' when that names a module of lib."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            submodules = [f"{module}.{a.name}" for a in node.names if module_path(f"{module}.{a.name}") is not None]
            found += [(node.lineno, m) for m in submodules] or [(node.lineno, module)]
    return found


def module_path(module: str) -> Path | None:
    """The file of ``lib.<...>`` (a module or a package's __init__), None if it is not one of lib's."""
    if not module.startswith("lib.") and module != "lib":
        return None
    base = APP_DIR.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(APP_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(p for p in LIB.rglob("*.py") if p != LIB / "__init__.py")


def import_graph(paths: Iterable[Path]) -> dict[str, set[str]]:
    """Module -> the lib modules it imports (any import statement anywhere in it)."""
    return {module_name(p): {m for _, m in imports(p) if module_path(m) is not None} for p in paths}


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every set of modules that import each other around a loop (a strongly connected component of more than
    one module, or a module that imports itself), sorted."""
    g = nx.DiGraph()
    g.add_nodes_from(graph)
    g.add_edges_from((a, b) for a, targets in graph.items() for b in targets)
    components = [sorted(c) for c in nx.strongly_connected_components(g)]
    return sorted(c for c in components if len(c) > 1 or g.has_edge(c[0], c[0]))


def upward_imports(graph: Mapping[str, Iterable[str]], layers: Mapping[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a module of a layer that ``layers`` does not allow (module names' second
    part is their layer: lib.<layer>...; 'main' is main.py)."""

    def layer(module: str) -> str:
        return module.split(".")[1] if module.startswith("lib.") else module

    return sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if layer(b) != layer(a) and layer(b) not in layers[layer(a)]
    )


def test_every_folder_and_module_of_lib_and_main_is_a_named_layer() -> None:
    present = {layer_of(p) for p in [*MODULES, MAIN]}
    assert present == set(LAYERS), "name each layer in LAYERS (and docs/layers.md): " + str(present ^ set(LAYERS))


def test_the_layer_map_itself_has_no_loop() -> None:
    assert import_cycles(LAYERS) == []
    assert all(below <= set(LAYERS) for below in LAYERS.values())


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(p) in PURE], ids=lambda p: str(p.relative_to(LIB)))
def test_engine_imaging_training_and_settings_import_no_web_server(path: Path) -> None:
    web = [f"{path.name}:{line} {m}" for line, m in imports(path) if m.split(".")[0] in WEB]
    assert web == [], "this layer must stay a plain library: " + ", ".join(web)


@pytest.mark.parametrize("path", [*MODULES, MAIN], ids=lambda p: str(p.relative_to(APP_DIR)))
def test_each_layer_imports_only_the_layers_its_entry_names(path: Path) -> None:
    layer = layer_of(path)
    wrong = upward_imports(import_graph([path]), LAYERS)
    assert wrong == [], f"{layer} may import only {sorted(LAYERS[layer])} from lib: " + ", ".join(wrong)


def test_no_import_cycle_between_lib_modules() -> None:
    cycles = import_cycles(import_graph([*MODULES, MAIN]))
    assert cycles == [], "modules that import each other (move what both need below them): " + str(cycles)


def test_the_checker_finds_a_cycle_and_an_upward_import_in_a_small_graph() -> None:
    layers = {"low": set(), "mid": {"low"}, "top": {"mid", "low"}}
    clean = {"lib.low.a": set(), "lib.mid.b": {"lib.low.a"}, "lib.top.c": {"lib.mid.b", "lib.low.a"}}
    assert import_cycles(clean) == [] and upward_imports(clean, layers) == []
    looped = {**clean, "lib.low.a": {"lib.low.d"}, "lib.low.d": {"lib.low.a"}, "lib.mid.b": {"lib.mid.b"}}
    assert import_cycles(looped) == [["lib.low.a", "lib.low.d"], ["lib.mid.b"]]
    around_layers = {**clean, "lib.low.a": {"lib.top.c"}}
    assert import_cycles(around_layers) == [["lib.low.a", "lib.mid.b", "lib.top.c"]]
    assert upward_imports(around_layers, layers) == ["lib.low.a -> lib.top.c"]
    assert upward_imports({"main": {"lib.top.c"}, "lib.top.c": set()}, {**layers, "main": set()}) == [
        "main -> lib.top.c"
    ]


def test_imports_inside_functions_and_for_type_checking_are_in_the_graph(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lib.engine.prompts import KeySlicePrompt\n"
        "def f():\n    from lib.server import patches\n    import lib.errors\n"
    )
    assert {m for _, m in imports(source)} >= {"lib.engine.prompts", "lib.server.patches", "lib.errors"}


def test_one_import_style_no_relative_imports() -> None:
    relative = [
        f"{p.relative_to(APP_DIR)}:{line}" for p in [*MODULES, MAIN] for line, m in imports(p) if m.startswith(".")
    ]
    assert relative == [], "import as lib.<package>.<module>: " + ", ".join(relative)
