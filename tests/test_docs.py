"""The docs stay true: README.md is short, links resolve, and documented commands exist.

Cheap checks over the Markdown files (no training): README.md ≤ 250 lines; every relative link
in README.md, docs/*.md and benchmarks/README.md names an existing file (and, with a #fragment,
a heading in it); every `tlpipe …` / `tlpipe-edge …` command in their code blocks names a real
command and real options of the CLI.
"""

from __future__ import annotations

import argparse
import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import typer

from tlpipe.cli import app
from tlpipe.edge.commands import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a command at the start of a line or after && / || / ;, maybe with a path (.venv/bin/tlpipe)
COMMAND = re.compile(r"(?:^\s*|(?:&&|\|\||;)\s*)(?:\S*/)?(tlpipe(?:-edge)?) +(.*)$")


SHELL = {"bash", "sh", "shell", "console", "cron", "ini"}  # fences that hold commands


def _blocks(text: str) -> tuple[list[str], list[str]]:
    """Split Markdown lines into (prose lines, lines of shell-like code blocks)."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = line.strip().strip("`").strip() if fence is None else None
        elif fence is None:
            prose.append(line)
        elif fence in SHELL:
            code.append(line)
    return prose, code


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → '-'."""
    text = heading.strip().lower()
    keep = (c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return "".join(keep).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    prose, _ = _blocks(path.read_text())
    return {_slug(line.lstrip("#")) for line in prose if re.match(r"#{1,6} ", line)}


def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines (≤ 250): move details to docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    assert doc.exists(), f"{doc} is missing"
    prose, _ = _blocks(doc.read_text())
    broken = []
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    assert not broken, f"{doc.name}: broken links: {broken}"


def _typer_commands() -> dict[str, set[str]]:
    """'fetch' → its options, 'pipeline submit' → its options, for every tlpipe command."""
    found: dict[str, set[str]] = {}

    def walk(cmd, prefix: str) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            key = f"{prefix} {name}".strip()
            if hasattr(sub, "commands"):  # a group (`tlpipe pipeline`): only its commands count
                walk(sub, key)
            else:
                found[key] = {o for p in sub.params for o in (*p.opts, *p.secondary_opts)}

    walk(typer.main.get_command(app), "")
    return found


def _edge_commands() -> dict[str, set[str]]:
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(p._option_string_actions) for name, p in subs.choices.items()}


def _documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file, program, argv) for each tlpipe / tlpipe-edge call in a code block."""
    calls = []
    for doc in DOCS:
        for line in _blocks(doc.read_text())[1]:
            m = COMMAND.search(line)
            if not m:
                continue
            words = shlex.split(m.group(2), comments=True)
            for i, word in enumerate(words):  # stop at the end of this command
                if word in {"&&", "||", "|", ";", ">", ">>", "2>&1"} or word.startswith(">"):
                    words = words[:i]
                    break
            calls.append((doc.name, m.group(1), words))
    return calls


def test_documented_commands_exist() -> None:
    commands = {"tlpipe": _typer_commands(), "tlpipe-edge": _edge_commands()}
    calls = _documented_commands()
    assert any(prog == "tlpipe" for _, prog, _ in calls), "no tlpipe command found in the docs"
    wrong = []
    for doc, prog, argv in calls:
        known = commands[prog]
        positional = [w for w in argv if not w.startswith("-")]
        names = (" ".join(positional[:2]), " ".join(positional[:1]))
        name = next((n for n in names if n in known), None)
        if name is None:
            wrong.append(f"{doc}: `{prog} {' '.join(argv)}`: no such command")
            continue
        for word in argv:
            option = word.split("=", 1)[0]
            if option.startswith("-") and option not in known[name] | {"--help", "-h"}:
                wrong.append(f"{doc}: `{prog} {name}` has no option {option}")
    assert not wrong, "\n".join(wrong)
