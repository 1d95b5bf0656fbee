"""The README and docs/ link only to files (and headings) that exist, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"```.*?```", re.DOTALL)
# a repository file named in prose, e.g. `tests/test_pacs.py`, `lib/engine/propagation.py`, `tests/test_fuzz_*.py`
NAMED_FILE = re.compile(r"`((?:apps|lib|tests|scripts|bench|docs)/[\w./*-]+\.(?:py|sh|md|yaml|png|jsonl))`")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces turned into hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", CODE_BLOCK.sub("", markdown), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(CODE_BLOCK.sub("", path.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_point_to_existing_files_and_headings(doc: Path) -> None:
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)}: broken links {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_files_named_in_the_text_exist(doc: Path) -> None:
    named = set(NAMED_FILE.findall(CODE_BLOCK.sub("", doc.read_text())))
    roots = [REPO, REPO / "apps" / "medsam2", doc.parent]  # `lib/...` is relative to the app
    missing = sorted(n for n in named if not any(any(root.glob(n)) for root in roots))
    assert not missing, f"{doc.relative_to(REPO)} names files that do not exist: {missing}"


def test_readme_is_short() -> None:
    assert len((REPO / "README.md").read_bytes()) <= 12_000
