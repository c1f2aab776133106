"""The documentation: a README a newcomer reads in minutes, and links that lead somewhere.

Reads the Markdown files only (no import of the package):

- the README's top, through the end of its "## Layout" section, is under 250 lines;
- its first code block holds exactly the two commands (install and demo, the test suite);
- every relative link in README.md, docs/*.md and benchmarks/README.md names a file that exists, and a
  link with a #anchor into a Markdown file names a heading of that file (GitHub's anchors);
- every page of docs/ and benchmarks/README.md is linked from the README.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]

TOP_LIMIT = 250
COMMANDS = ['pip install -e ".[test]" && fedclip-lightning', "python -m pytest -q"]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`+[^`]*`+")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def code_blocks(text: str) -> list[list[str]]:
    blocks, current = [], None
    for line in text.splitlines():
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: the text as rendered, lowercase, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            a = anchor(m.group(2))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link that is not to another site, outside code."""
    links = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:...
                links.append((n, target))
    return links


def broken_links(path: Path) -> list[str]:
    problems = []
    for n, target in relative_links(path):
        file, _, frag = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        where = f"{path.relative_to(REPO)}:{n}: ({target})"
        if not dest.exists():
            problems.append(f"{where} no such file")
        elif frag and dest.suffix == ".md" and frag.lower() not in anchors(dest):
            problems.append(f"{where} no heading with the anchor #{frag} in {dest.relative_to(REPO)}")
    return problems


def readme_top_lines() -> int:
    """The number of lines from the README's first line through the end of its "## Layout" section."""
    lines = README.read_text(encoding="utf-8").splitlines()
    headings = [(n, len(m.group(1)), m.group(2)) for n, line in prose_lines("\n".join(lines))
                if (m := HEADING.match(line))]
    starts = [n for n, level, title in headings if level == 2 and title == "Layout"]
    assert starts, 'the README has no "## Layout" section'
    after = [n for n, level, _ in headings if n > starts[0] and level <= 2]
    end = after[0] - 1 if after else len(lines)
    while end > 0 and not lines[end - 1].strip():  # the blank lines before the next section
        end -= 1
    return end


def test_readme_top_through_layout_is_under_250_lines():
    top = readme_top_lines()
    assert top < TOP_LIMIT, f"the README's top, through the Layout section, is {top} lines (limit {TOP_LIMIT})"


def test_readme_first_code_block_has_the_two_commands():
    blocks = code_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has no code block"
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in blocks[0]]
    assert [c for c in commands if c] == COMMANDS


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_readme_and_docs_links_resolve(page):
    assert page.exists(), f"{page.relative_to(REPO)} is missing"
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in relative_links(README)}
    unlinked = [str(p.relative_to(REPO)) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"pages the README does not link: {unlinked}"


def test_readme_link_anchors_follow_github_rules():
    assert anchor("The demo's small CLIP") == "the-demos-small-clip"
    assert anchor("Reproducibility: what is bitwise, and where") == "reproducibility-what-is-bitwise-and-where"
    assert anchor("Checkpoints, resume, preemption") == "checkpoints-resume-preemption"
    assert anchor("`fedclip_ft` and *more*") == "fedclip_ft-and-more"
