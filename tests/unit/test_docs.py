"""The README stays user documentation, and the documentation's links lead somewhere."""

from __future__ import annotations

import re

import typer.main

from llmprune.cli.app import app
from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 350, f"README.md has {lines} lines: move detail to docs/commands/<command>.md (limit 350)"


def test_readme_shows_every_command():
    readme = README.read_text(encoding="utf-8")
    commands = typer.main.get_command(app).commands
    assert sorted(name for name in commands if f"`llmprune {name}`" not in readme) == []


def test_relative_links_in_the_docs_point_to_files():
    broken = []
    for page in [README, *sorted((REPO_ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO_ROOT)} -> {target}")
    assert broken == []
