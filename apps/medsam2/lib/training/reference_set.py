"""The frozen reference set: studies labelled before a run that no later run trains on, so that every run's
candidate model can be checked against them before it is published ("do no harm"). The first run's held-out
studies become the set; it is kept in ``reference_studies.json`` beside the published checkpoint (shared by
replicas and kept across restarts). No MONAI Label imports."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lib.atomic_files import write_json_atomic

REFERENCE_FILE = "reference_studies.json"
Item = TypeVar("Item", bound=tuple)  # (name, ...) as the trainer lists its studies


def reference_file(published_checkpoint: Path) -> Path:
    return published_checkpoint.parent / REFERENCE_FILE


def read_reference_names(path: Path) -> list[str]:
    """The frozen study names; none when the file is missing or unreadable (then the next run freezes anew)."""
    try:
        names = json.loads(path.read_text()).get("studies", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str)]


def freeze_reference(path: Path, names: list[str]) -> None:
    write_json_atomic(path, {"studies": sorted(names), "frozen_at": time.time()})


@dataclass
class StudySplit:
    """What a run trains on, validates on (held out, new), and checks before publishing (reference)."""

    train: list
    held_out: list
    reference: list
    newly_frozen: bool = False


def split_studies(items: list[Item], val_fraction: float, frozen: list[str]) -> StudySplit:
    """Split ``items`` (sorted; each item's first field is the study name): the frozen reference studies are set
    aside; of the rest, the last ``val_fraction`` are held out. With no frozen set yet, the held-out studies are
    frozen as the reference set for later runs (``newly_frozen``); this run has no separate reference.
    ValueError when every study is in the frozen set (training on them would void the check)."""
    frozen_set = set(frozen)
    reference = [i for i in items if i[0] in frozen_set]
    rest = [i for i in items if i[0] not in frozen_set]
    if not rest:
        raise ValueError(
            f"all {len(items)} labelled studies are in the frozen reference set ({REFERENCE_FILE} beside the "
            "published checkpoint), which training never uses: label new studies first, or delete that file to "
            "choose a new reference set"
        )
    n_val = max(1, round(len(rest) * val_fraction)) if len(rest) > 1 else 0
    train, held_out = rest[: len(rest) - n_val], rest[len(rest) - n_val :]
    if not held_out:  # a single study: validate on it (better than no signal at all)
        held_out = rest
    return StudySplit(train, held_out, reference, newly_frozen=not frozen and len(rest) > 1)
