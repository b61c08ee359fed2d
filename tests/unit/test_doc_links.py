"""Every relative link in README.md and docs/*.md resolves: the file it names exists, relative to the page
that holds the link, and a ``#anchor`` into a markdown page is one of that page's heading slugs (GitHub's
rule). Markdown links and images, and HTML ``<img src>`` / ``<a href>``; http(s), mailto and other
schemes are skipped, and so is anything inside code. No network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$")
HTML_ID = re.compile(r"<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code spans blanked out, every offset and line kept."""
    lines, fenced = [], None
    for line in text.split("\n"):
        opening = FENCE.match(line)
        if fenced is None and opening:
            fenced = opening.group(1)
            lines.append("")
        elif fenced is not None:
            if line.strip().startswith(fenced):
                fenced = None
            lines.append(" " * len(line))
        else:
            lines.append(line)
    return CODE_SPAN.sub(_blank, "\n".join(lines))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links by their text, code by its content), lowercase,
    punctuation but '-' and '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's slug (a repeated one gets -1, -2, ... as on GitHub) and every HTML id or name."""
    seen: dict[str, int] = {}
    text = page.read_text(encoding="utf-8")
    found = set(HTML_ID.findall(text))
    fenced = None
    for line in text.split("\n"):
        opening = FENCE.match(line)
        if fenced is None and opening:
            fenced = opening.group(1)
            continue
        if fenced is not None:
            if line.strip().startswith(fenced):
                fenced = None
            continue
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code, in order."""
    text = without_code(page.read_text(encoding="utf-8"))
    found = [(m.start(), m.group(1)) for pattern in (MD_LINK, HTML_LINK) for m in pattern.finditer(text)]
    return [(text.count("\n", 0, start) + 1, target) for start, target in sorted(found)]


def broken_links(page: Path) -> list[str]:
    """One line per relative link of ``page`` that does not resolve: 'page:line: target: why'."""
    problems = []
    for line, target in links(page):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto, ...: not checked here
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        where = f"{page.name}:{line}: {target}"
        if not file.exists():
            problems.append(f"{where}: no such file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{where}: no heading #{anchor} in {file.name}")
    return problems


def test_the_pages_exist_and_hold_links():
    assert len(PAGES) >= 2 and sum(len(links(page)) for page in PAGES) >= 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page_and_each_links_back():
    readme = {(ROOT / target.partition("#")[0]).resolve() for _, target in links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert page.resolve() in readme, f"README.md does not link {page.relative_to(ROOT)}"
        back = {(page.parent / t.partition("#")[0]).resolve() for _, t in links(page) if not SCHEME.match(t)}
        assert (ROOT / "README.md").resolve() in back, f"{page.relative_to(ROOT)} does not link back to README.md"


def test_slugs_follow_github():
    assert slug("On a GPU (`bench/gpu_check`)") == "on-a-gpu-benchgpu_check"
    assert slug("6. The learning-rate schedule, and what it means in hours") == (
        "6-the-learning-rate-schedule-and-what-it-means-in-hours"
    )
    assert slug("Searching: `flowpp tune`") == "searching-flowpp-tune"
    assert slug("See [the model](model.md)") == "see-the-model"


def test_a_broken_link_would_fail(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Same\n\n## Same\n\n```\n# not a heading\n```\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok](other.md#other-page) [ok](other.md#same-1) [ok](#page) ![ok](pic.png)\n"
        "[web](https://example.com/none) [mail](mailto:a@b.c) `[in code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
        "[gone](missing.md)\n"
        "[bad anchor](other.md#not-a-heading)\n"
        '<img src="nopic.png" width="45%"> ![gone](img/none.png)\n'
        "[bad local anchor](#nowhere)\n"
    )
    assert [p.split(": ", 1)[0] for p in broken_links(page)] == [
        "page.md:8",
        "page.md:9",
        "page.md:10",
        "page.md:10",
        "page.md:11",
    ]
    assert "missing.md" in broken_links(page)[0] and "#not-a-heading" in broken_links(page)[1]
