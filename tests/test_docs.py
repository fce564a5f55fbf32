"""The documentation holds together: README.md is a front page (at most 250 lines, the two
commands for a fresh machine in its first 40, a link to every page of docs/), and every relative
link of README.md, ARCHITECTURE.md and docs/*.md names a file that exists and, with ``#anchor``,
a heading of that file. Plain text, no imports of the project; well under a second."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGES = [REPO_ROOT / "README.md", REPO_ROOT / "ARCHITECTURE.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``-`` and ``_`` kept),
    each space a ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings (outside code blocks); a repeated one also as ``-1``, ``-2``..."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            base = slug(m.group(1))
            seen[base if base not in seen else f"{base}-{seen[base]}"] = 0
            seen[base] = seen.get(base, 0) + 1
    return set(seen)


def relative_links(page: Path) -> list[str]:
    """Targets of ``[text](target)`` links in ``page`` outside code blocks, except URLs."""
    text = FENCE.sub("", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def broken_links(pages: list[Path]) -> list[tuple[str, str]]:
    """``(page name, target)`` for every relative link whose file or heading does not exist."""
    broken = []
    for page in pages:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
                broken.append((page.name, target))
    return broken


def test_every_relative_link_names_an_existing_file_and_heading():
    """Catches: a page moved or renamed, a heading reworded under a link to it."""
    assert broken_links(PAGES) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    """The check itself: links to a file and to a heading that are not there are found; a link in
    a code block is not a link."""
    page = tmp_path / "page.md"
    page.write_text("# A heading: `with` code\n[ok](#a-heading-with-code) [gone](nope.md) [bad](#nope)\n"
                    "```\n[in code](ignored.md)\n```\n")
    assert broken_links([page]) == [("page.md", "nope.md"), ("page.md", "#nope")]


def test_the_readme_is_a_front_page_with_both_commands_first():
    """Catches: a README grown past 250 lines, the commands for a fresh machine pushed below line
    40, a main job that no longer ends with the report, a docs page the README does not link."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    commands = [line for line in lines[:40] if line.startswith("python3.11 -m venv .venv && ")]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "orchestrate.py --preset smoke" in main_job and main_job.endswith("--report")
    assert tests.endswith(".venv/bin/python -m pytest -q")
    linked = {(REPO_ROOT / t.partition("#")[0]).resolve() for t in relative_links(REPO_ROOT / "README.md")}
    assert sorted(p.name for p in (REPO_ROOT / "docs").glob("*.md") if p.resolve() not in linked) == []
