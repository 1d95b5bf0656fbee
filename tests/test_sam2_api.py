"""SAM2 behind one door: only lib/engine/sam2_api.py touches SAM2's private methods and attributes."""

from __future__ import annotations

import ast
from pathlib import Path

from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.sam2_video_predictor import SAM2VideoPredictor

from sam2_testing import APP_DIR

DOOR = APP_DIR / "lib" / "engine" / "sam2_api.py"


def sam2_private_names() -> set[str]:
    """Names with one leading underscore defined by SAM2's model and predictor classes (and their bases)."""
    names: set[str] = set()
    for cls in (SAM2Base, SAM2VideoPredictor, SAM2ImagePredictor):
        for klass in cls.__mro__:
            if klass.__module__.startswith("sam2."):
                names |= {n for n in vars(klass) if n.startswith("_") and not n.startswith("__")}
    return names


def private_uses(path: Path, private: set[str]) -> list[str]:
    """``x._name`` in ``path`` where ``_name`` is one of SAM2's private names and ``x`` is not ``self``."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr in private:
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                uses.append(f"{path.relative_to(APP_DIR)}:{node.lineno} .{node.attr}")
    return uses


def private_sam2_imports(path: Path) -> list[str]:
    """Imports of SAM2's private modules or names (such as its CUDA extension ``sam2._C``) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "sam2" and any(part.startswith("_") and not part.startswith("__") for part in parts):
                found.append(f"{path.relative_to(APP_DIR)}:{node.lineno} {module}")
    return found


def test_the_private_names_are_known() -> None:
    assert {"_track_step", "_encode_new_memory", "_forward_sam_heads", "_prepare_backbone_features"} <= (
        sam2_private_names()
    )


def test_only_the_door_calls_sam2_private_methods() -> None:
    private = sam2_private_names()
    found = [
        use for path in sorted((APP_DIR / "lib").rglob("*.py")) if path != DOOR for use in private_uses(path, private)
    ]
    assert found == [], "call these through lib/engine/sam2_api.py: " + ", ".join(found)
    assert private_uses(DOOR, private), "the door itself uses SAM2's private methods"


def test_only_the_door_imports_sam2_private_modules() -> None:
    found = [
        use for path in sorted((APP_DIR / "lib").rglob("*.py")) if path != DOOR for use in private_sam2_imports(path)
    ]
    assert found == [], "use these through lib/engine/sam2_api.py: " + ", ".join(found)
    assert [use.split(" ")[1] for use in private_sam2_imports(DOOR)] == ["sam2._C"]
