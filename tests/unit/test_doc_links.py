"""Every relative link in README.md and docs/*.md reaches a file, and every anchor a heading."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# An inline link or image: `[text](target)` / `![alt](target "title")`; the target up to a space.
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def pages() -> list[Path]:
    """The documents a reader follows links through."""
    return [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out."""
    lines: list[str] = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "`code`", line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation dropped, spaces hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link reads as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    kept = "".join(char for char in text.lower() if char.isalnum() or char in " -_")
    return kept.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors GitHub makes for a page's headings (repeats get `-1`, `-2`, ...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        match = HEADING.match(line)
        if fenced or match is None:
            continue
        slug = github_slug(match[2])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(found)


def links(path: Path) -> list[str]:
    """The relative link targets of a page (no scheme, no `mailto:`), in order."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(line):
            target = match[1]
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                targets.append(target)
    return targets


def broken(path: Path) -> list[str]:
    """Each link of the page whose file is missing or whose anchor names no heading there."""
    problems = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with that anchor")
        elif anchor and resolved.suffix != ".md":
            problems.append(f"{target}: an anchor into a file that is not Markdown")
    return problems


def test_every_relative_link_and_anchor_resolves() -> None:
    """README.md and every docs/*.md page link only to files and headings that exist."""
    problems = {
        str(path.relative_to(PROJECT_ROOT)): broken(path) for path in pages() if broken(path)
    }
    assert problems == {}


def test_the_checker_sees_links_the_way_github_does(tmp_path: Path) -> None:
    """Slugs follow GitHub's rules; links in code are not links; a bad file or anchor is caught."""
    assert github_slug("Operations: reload, drain, restart") == "operations-reload-drain-restart"
    assert github_slug("`keys[].route`") == "keysroute"
    assert github_slug("One key per person, or one key for an application") == (
        "one-key-per-person-or-one-key-for-an-application"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Title\n\n[ok](#title-1) [self](page.md#title) `[code](missing.md)`\n\n"
        "```\n[fenced](missing.md)\n```\n\n[gone](missing.md) [bad](#nowhere) "
        "[web](https://example.com/x)\n",
        encoding="utf-8",
    )
    assert broken(page) == ["missing.md: no such file", "#nowhere: no heading with that anchor"]


def test_readme_is_a_front_door_that_maps_every_page() -> None:
    """README.md stays within 300 lines and links to every docs/*.md page."""
    readme = PROJECT_ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 300
    linked = {(readme.parent / target.partition("#")[0]).resolve() for target in links(readme)}
    unmapped = [page.name for page in pages()[1:] if page.resolve() not in linked]
    assert unmapped == []
