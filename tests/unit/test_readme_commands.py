"""Every ``flowpp`` command line that README.md and docs/ quote still parses: whole lines in code
blocks through the real parser; inline mentions by their command names and flags."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from orchestrator.cli import build_parser

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "infra").glob("**/*.md"))]


def code_lines(text: str) -> list[str]:
    """``flowpp ...`` lines of fenced code blocks, continuation lines joined, prompts and comments off."""
    lines, fenced, pending = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            continue
        line = pending + raw.strip().removeprefix("$ ")
        pending = line[:-1] + " " if line.endswith("\\") else ""
        if not pending and re.match(r"flowpp\s", line) and not re.match(r"flowpp [a-z]+: ", line):  # not an error
            lines.append(line)
    return lines


def inline_mentions(text: str) -> list[str]:
    return re.findall(r"`(flowpp(?:\s[^`]*)?)`", text)


def _argv(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    return words[1:]


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


QUOTED = [(page.name, line) for page in PAGES for line in code_lines(page.read_text())]


def test_the_pages_quote_commands():
    assert len(QUOTED) >= 15 and len(inline_mentions((ROOT / "README.md").read_text())) >= 15


@pytest.mark.parametrize(("page", "line"), QUOTED)
def test_a_quoted_command_line_parses(page, line):
    parser = build_parser()
    parser.exit = lambda status=0, message=None: pytest.fail(f"{page}: `{line}`: {message}")  # type: ignore
    for sub in _commands(parser).values():
        sub.exit = parser.exit  # type: ignore[method-assign]
    args = parser.parse_args(_argv(line))
    assert getattr(args, "func", None), f"{page}: `{line}` names no command"


@pytest.mark.parametrize("mention", sorted({m for page in PAGES for m in inline_mentions(page.read_text())}))
def test_an_inline_mention_names_real_commands_and_flags(mention):
    """``flowpp train|submit ... --new-run``, ``flowpp logs/status/stop``: each name a command or a global
    flag, each --flag one that a named command (or flowpp itself) takes."""
    parser = build_parser()
    commands, words = _commands(parser), mention.split()[1:]
    named = [w for w in re.split(r"[/|]", words[0]) if w] if words else []
    known, anywhere = _flags(parser), set().union(*map(_flags, commands.values()))
    for name in named:  # a list of names may mix commands and flags (--version/validate/--dry-run)
        assert name in commands or name in known | anywhere, f"`{mention}`: {name!r} is no flowpp command or flag"
        if name in commands:
            known |= _flags(commands[name])
    flags = [f for w in words[1:] for f in re.split(r"[/|]", w.split("=")[0]) if f.startswith("--")]
    for flag in flags:
        assert flag in known, f"`{mention}`: {flag} is not a flag of {named or 'flowpp'}"


def test_a_stale_flag_would_fail():
    bad = "```bash\nflowpp prepare demo --output s3://b/x --no-such-flag\n```\n"
    assert code_lines(bad) == ["flowpp prepare demo --output s3://b/x --no-such-flag"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(_argv(code_lines(bad)[0]))
