"""The layers of apps/medsam2/lib, as the folders name them, hold: the SAM2 engine, imaging and training import
no web server (MONAI Label, FastAPI, Starlette), and each layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sam2_testing import APP_DIR

LIB = APP_DIR / "lib"
WEB = ("monailabel", "fastapi", "starlette", "uvicorn")
# layer -> the parts of lib it may import (besides itself)
BELOW = {
    "errors": set(),
    "atomic_files": set(),
    "log_identifiers": set(),
    "imaging": {"errors", "atomic_files"},
    "engine": {"errors", "atomic_files", "imaging"},
    "training": {"errors", "atomic_files", "imaging", "engine"},
    "storage": {"errors", "atomic_files", "imaging", "log_identifiers"},
}
PURE = ("errors", "atomic_files", "log_identifiers", "imaging", "engine", "training")


def layer_of(path: Path) -> str:
    return path.relative_to(LIB).parts[0].removesuffix(".py")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, those inside functions too; relative ones as '.name'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


MODULES = sorted(LIB.rglob("*.py"))


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(p) in PURE], ids=lambda p: str(p.relative_to(LIB)))
def test_engine_imaging_and_training_import_no_web_server(path: Path) -> None:
    web = [f"{path.name}:{line} {m}" for line, m in imports(path) if m.split(".")[0] in WEB]
    assert web == [], "this layer must stay a plain library: " + ", ".join(web)


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(p) in BELOW], ids=lambda p: str(p.relative_to(LIB)))
def test_each_layer_imports_only_the_layers_below_it(path: Path) -> None:
    layer = layer_of(path)
    allowed = BELOW[layer] | {layer}
    wrong = [
        f"{path.name}:{line} {m}"
        for line, m in imports(path)
        if m.startswith("lib.") and m.split(".")[1] not in allowed
    ]
    assert wrong == [], f"lib/{layer} may import only {sorted(allowed)} from lib: " + ", ".join(wrong)


def test_one_import_style_no_relative_imports() -> None:
    relative = [
        f"{p.relative_to(APP_DIR)}:{line}"
        for p in [*MODULES, APP_DIR / "main.py"]
        for line, m in imports(p)
        if m.startswith(".")
    ]
    assert relative == [], "import as lib.<package>.<module>: " + ", ".join(relative)
