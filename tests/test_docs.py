"""docs/: every `docs/<file>.md#<section>` pointer in the code, tests, benchmarks and README names a real
section, and the code no longer cites the external reference document."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCES = ("lyra_cli", "benchmarks", "tests")
# A pointer such as `docs/authors-behaviour.md#m-rope-positions`; the anchor may be absent.
POINTER = re.compile(r"docs/([\w./-]+?\.md)(?:#([\w-]+))?")
# A relative link inside docs/: `(release-format.md#config-keys)` or `(#audio-front-end)`.
DOC_LINK = re.compile(r"\]\(([\w.-]*\.md)?(?:#([\w-]+))?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
EXTERNAL_REFERENCE = "official-lyra.md"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower-case, punctuation removed, spaces → '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of a markdown file's headings (code blocks skipped)."""
    found: set[str] = set()
    in_code = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := HEADING.match(line)):
            found.add(slug(match.group(1)))
    return found


def source_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in SOURCES:
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md"} and p.is_file())
    return [p for p in files if p != Path(__file__).resolve()]


def pointers() -> list[tuple[str, str, str | None]]:
    """(where, doc file, anchor) for each docs/ pointer in the sources."""
    found = []
    for path in source_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in POINTER.finditer(line):
                found.append((f"{path.relative_to(ROOT)}:{n}", match.group(1), match.group(2)))
    return found


def test_slug_follows_githubs_rule() -> None:
    assert slug("M-RoPE positions") == "m-rope-positions"
    assert slug("Tokenizer and special ids") == "tokenizer-and-special-ids"
    assert slug("What `config.json` holds (v2)") == "what-configjson-holds-v2"


def test_the_sources_point_into_docs() -> None:
    # The citations were moved here from the external reference: a pointer-free tree means the scan broke.
    assert len(pointers()) >= 50


@pytest.mark.parametrize("where, doc, anchor", pointers())
def test_each_pointer_names_an_existing_section(where: str, doc: str, anchor: str | None) -> None:
    target = DOCS / doc
    assert target.is_file(), f"{where}: `docs/{doc}` does not exist"
    if anchor is not None:
        assert anchor in anchors(target), f"{where}: `docs/{doc}` has no section `#{anchor}`"


@pytest.mark.parametrize("doc", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_links_inside_docs_resolve(doc: Path) -> None:
    for match in DOC_LINK.finditer(doc.read_text(encoding="utf-8")):
        target = DOCS / match.group(1) if match.group(1) else doc
        assert target.is_file(), f"{doc.name}: link to missing `{match.group(1)}`"
        if match.group(2):
            assert match.group(2) in anchors(target), f"{doc.name}: `{target.name}` has no `#{match.group(2)}`"


def test_the_package_no_longer_cites_the_external_reference() -> None:
    citing = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "lyra_cli").rglob("*.py"))
        if EXTERNAL_REFERENCE in p.read_text(encoding="utf-8")
    ]
    assert citing == []


def test_readme_points_to_docs() -> None:
    assert "docs/README.md" in (ROOT / "README.md").read_text(encoding="utf-8")
