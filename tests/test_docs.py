"""The documentation's links and test references point at things that exist.

README.md and docs/*.md are read as GitHub renders them: links inside code (fenced blocks, inline code) are not
links; a relative link must name an existing file or directory, and a ``#anchor`` into a Markdown file must name
one of its headings by GitHub's slug rule. Every ``tests/<path>.py::test_name`` mentioned anywhere in those pages
must be a test function defined in that file, so a promise in docs/guarantees.md cannot outlive its test.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); the target may be wrapped in <...>
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
TEST_REF = re.compile(r"(tests/[\w/.-]+\.py)::(\w+)")
PIPE = re.compile(r"(?<!\\)\|")
TEST_DEF = re.compile(r"^\s*(?:async\s+)?def\s+(test_\w+)\s*\(", re.M)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags render as nothing
    text = text.replace("`", "").lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in " -_" or cat[0] in "LNM":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        m = REFDEF.match(line)
        if m:
            found.append((n, m.group(1)))
            continue
        for lm in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((n, lm.group(1)))
    return found


def broken(page: Path, target: str) -> str | None:
    """Why the link is broken, or None."""
    if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto: ...
        return None
    file_part, _, anchor = target.partition("#")
    dest = page if not file_part else (page.parent / unquote(file_part)).resolve()
    if not dest.exists():
        return f"no such file: {file_part}"
    if ROOT not in dest.parents and dest != ROOT:
        return f"outside the repository: {file_part}"
    if anchor and dest.suffix.lower() == ".md" and unquote(anchor).lower() not in anchors(dest):
        return f"no heading #{anchor} in {dest.relative_to(ROOT)}"
    return None


@cache
def defined_tests(path: Path) -> frozenset[str]:
    return frozenset(TEST_DEF.findall(path.read_text(encoding="utf-8")))


def test_the_pages_exist() -> None:
    assert (ROOT / "README.md").is_file()
    assert (ROOT / "docs" / "README.md").is_file(), "docs/README.md is the index of docs/"
    assert len(PAGES) > 2


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    bad = []
    for n, target in links(page):
        why = broken(page, target)
        if why:
            bad.append(f"{page.relative_to(ROOT)}:{n}: ({target}) {why}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_tests_exist(page: Path) -> None:
    bad = []
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for m in TEST_REF.finditer(line):
            path, name = ROOT / m.group(1), m.group(2)
            if not path.is_file():
                bad.append(f"{page.relative_to(ROOT)}:{n}: no such test file {m.group(1)}")
            elif name not in defined_tests(path):
                bad.append(f"{page.relative_to(ROOT)}:{n}: no test {name} in {m.group(1)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_bare_pipe_inside_code_in_a_table_row(page: Path) -> None:
    # GitHub splits table cells at every unescaped |, even inside `code`: the row then has cells too many.
    bad = []
    for n, line in prose_lines(page.read_text(encoding="utf-8")):
        if line.lstrip().startswith("|"):
            bad += [
                f"{page.relative_to(ROOT)}:{n}: {m.group(0)}"
                for m in INLINE_CODE.finditer(line)
                if PIPE.search(m.group(0))
            ]
    assert not bad, "write \\| inside code in a table, or reword:\n" + "\n".join(bad)


def test_every_docs_page_is_linked_from_the_index_or_the_front_page() -> None:
    linked = {
        (p.parent / t.partition("#")[0]).resolve()
        for p in (ROOT / "README.md", ROOT / "docs" / "README.md")
        for _, t in links(p)
        if t and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)
    }
    orphans = [p.name for p in PAGES[1:] if p.name != "README.md" and p.resolve() not in linked]
    assert not orphans, f"docs pages no index links to: {orphans}"


# The checker itself: a checker that passes everything proves nothing.


def test_slug_follows_githubs_rules() -> None:
    assert slug("Chunks, directories and resuming") == "chunks-directories-and-resuming"
    assert slug("Measured (client)") == "measured-client"
    assert (
        slug("Loading with `bq` instead, and BigQuery's limits")
        == "loading-with-bq-instead-and-bigquerys-limits"
    )
    assert slug("Consolidated files (`consolidate`)") == "consolidated-files-consolidate"
    assert slug("export_mongo → load") == "export_mongo--load"
    assert slug("See [the docs](x.md) here") == "see-the-docs-here"


def test_the_checker_catches_broken_links_and_missing_tests(tmp_path: Path) -> None:
    page = ROOT / "docs" / "README.md"
    assert broken(page, "embedding.md") is None
    assert broken(page, "https://example.com/x") is None
    assert broken(page, "no-such-page.md") == "no such file: no-such-page.md"
    assert broken(page, "embedding.md#input") is None
    assert broken(page, "embedding.md#no-such-heading") is not None
    md = tmp_path / "x.md"
    md.write_text(
        "# Top\n\n```\n# not a heading\n[a](missing.md)\n```\n## Top\n`[b](missing.md)` [c](#top-1)\n"
    )
    assert anchors(md) == {"top", "top-1"}
    assert [t for _, t in links(md)] == ["#top-1"]
    assert TEST_REF.findall("`tests/test_docs.py::test_the_pages_exist`") == [
        ("tests/test_docs.py", "test_the_pages_exist")
    ]
    assert [m.group(0) for m in INLINE_CODE.finditer("| `a|b` | `c\\|d` |") if PIPE.search(m.group(0))] == [
        "`a|b`"
    ]
    assert "test_the_pages_exist" in defined_tests(Path(__file__))
    assert "test_nothing_like_this" not in defined_tests(Path(__file__))
