"""README.md and docs/ link to each other by relative paths and #anchors: a page renamed or a heading
reworded breaks them silently on GitHub, so every link is resolved here as GitHub would resolve it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks: a `#` in a shell example is no heading, a link in code no link."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): the rendered text, lower-cased, punctuation but
    hyphens and underscores dropped, each space a hyphen; runs of hyphens are kept, not collapsed."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text, not its target
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, a repeated one numbered -1, -2, ... as GitHub numbers them."""
    seen: Counter[str] = Counter()
    found = set()
    for line in prose_lines(page):
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return found


def links(page: Path) -> list[str]:
    """Relative link and image targets of the page's prose; web addresses are not ours to check."""
    targets = []
    for line in prose_lines(page):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                targets.append(target)
    return targets


def broken_link(page: Path, target: str) -> str | None:
    """Why `target`, linked from `page`, does not resolve; None where it does."""
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    if not linked.exists():
        return f"{path}: no such file"
    if anchor and linked.suffix != ".md":
        return f"#{anchor}: {path} is not a Markdown page"
    if anchor and anchor not in anchors(linked):
        return f"#{anchor}: no heading of {path or page.name} has that anchor"
    return None


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    broken = {target: why for target in links(page) if (why := broken_link(page, target))}
    assert broken == {}


def test_the_readme_maps_every_page_of_docs():
    """README's Docs section is how a reader finds a page: a page it leaves out is a page nobody reads."""
    readme_links = set(links(ROOT / "README.md"))
    unmapped = [page.name for page in PAGES[1:] if f"docs/{page.name}" not in readme_links]
    assert unmapped == []


@pytest.mark.parametrize(("heading", "slug"), [
    ("HTTP/JSON, server-sent events and the playground", "httpjson-server-sent-events-and-the-playground"),
    ("OpenAI-style `/v1/completions`", "openai-style-v1completions"),
    ("Several replicas: sticky routing, hibernation to Redis, migration",
     "several-replicas-sticky-routing-hibernation-to-redis-migration"),
    ("Fork - and [generate](API.md)", "fork---and-generate"),
    ("2 \u00d7 512 LSTM_cell", "2--512-lstm_cell"),
])
def test_anchors_follow_githubs_slug_rules(heading, slug):
    assert github_slug(heading) == slug


def test_a_missing_page_and_a_missing_anchor_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## Part\n\n## Part\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#part-1) [b](other.md#not-a-heading) [c](gone.md) ![d](other.md) `[e](gone.md)`\n")
    assert {target: broken_link(page, target) for target in links(page)} == {
        "other.md#part-1": None,
        "other.md#not-a-heading": "#not-a-heading: no heading of other.md has that anchor",
        "gone.md": "gone.md: no such file",
        "other.md": None,
    }
