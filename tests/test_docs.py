"""The README and docs/: links that resolve, a flags page that matches the code, a short front door."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from docs import flags

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`]*`")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown page outside code blocks (indented four spaces, or fenced)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced and not line.startswith(("    ", "\t")):
            lines.append(line)
    return lines


def links(page: Path) -> list[str]:
    """Every link and image target of ``page``, outside code."""
    return [m.group(1) for line in prose_lines(page.read_text(encoding="utf-8"))
            for m in LINK.finditer(CODE_SPAN.sub("", line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            base = slug(match.group(1))
            result.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return result


def test_slug_follows_github() -> None:
    assert slug("Why these defaults") == "why-these-defaults"
    assert slug("study.py") == "studypy"
    assert slug("SLURM (`slurm/finetune.sh`)") == "slurm-slurmfinetunesh"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    targets = links(page)
    assert targets, f"{page.name} has no links: the pattern no longer finds them"
    broken = []
    for target in targets:
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading '#{anchor}' in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {'; '.join(broken)}"


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md links no page {', '.join(unlinked)}"


def test_flags_page_is_current() -> None:
    assert flags.PAGE.read_text(encoding="utf-8") == flags.render(), (
        "docs/flags.md differs from the configuration dataclasses: run `python -m docs.flags` to rewrite it")


def test_flags_page_lists_every_field() -> None:
    import dataclasses
    import importlib

    text = flags.PAGE.read_text(encoding="utf-8")
    for _, _, module, name in flags.COMMANDS:
        for f in dataclasses.fields(getattr(importlib.import_module(module), name)):
            shown = f.name.upper() if f.metadata.get("positional") else "--" + f.name.replace("_", "-")
            assert f"`{shown}" in text, f"{name}.{f.name} is missing from docs/flags.md"


def test_flags_script_needs_no_torch() -> None:
    # The flags page is written from modules that --help also reads: they must stay free of torch.
    code = "import sys, docs.flags; docs.flags.render(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move the "
                                       "detail into a page under docs/ and link it")
