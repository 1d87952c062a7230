"""The docs and the command agree: every ``casfs COMMAND`` and ``--option`` the docs show
exists, and the user guide (docs/guide.md) documents every command and every option.

Commands are taken from real text: ``$ casfs ...`` lines of console blocks, lines of shell
blocks, and inline code spans starting with ``casfs``. The command's side is its real
``--help`` output.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import casfs

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide.md"
LONG_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# the command word: casfs (or .venv/bin/casfs), after sudo/time/nice/env prefixes, if any
INVOCATION = re.compile(
    r"^(?:(?:sudo|time|exec|nice(?:\s+-n\s*-?\d+)?|env(?:\s+\w+=\S*)*)\s+)*(?:\S*/)?casfs"
    r"(?:\s+(?P<rest>.*))?$",
    re.S,
)
SHELL_SEPARATOR = re.compile(r"&&|\|\||[|;]|\$\(|`")
# argparse's answer to a wrong command line, shown as its output by a console block
REFUSED = re.compile(r"^casfs(?: [a-z]+)?: error: .*(?:invalid choice|unrecognized arguments)")


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# -- the command's side -----------------------------------------------------------------------


@functools.cache
def help_text(*command: str) -> str:
    r = casfs(*command, "--help")
    assert r.returncode == 0, f"casfs {' '.join(command)} --help: {r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


@functools.cache
def subcommands() -> tuple[str, ...]:
    """The COMMAND list of ``casfs --help`` (``    name   help`` lines)."""
    names = re.findall(r"^ {4}([a-z][a-z0-9-]*)(?: {2,}|$)", help_text(), re.M)
    assert len(names) >= 10, help_text()
    return tuple(names)


@dataclass(frozen=True)
class OptionEntry:
    flags: tuple[str, ...]  # -x, --foo
    help: str


def option_entries(command: str) -> list[OptionEntry]:
    """The entries of the ``options:`` section of ``casfs COMMAND --help``."""
    text = help_text(command)
    section = text.split("\noptions:\n", 1)
    assert len(section) == 2, text
    entries: list[tuple[str, list[str]]] = []
    for line in section[1].splitlines():
        if not line.strip():
            break
        if re.match(r"^  -", line):  # an entry: flags, then (maybe) help after 2+ spaces
            flags, _, first = line.strip().partition("  ")
            entries.append((flags, [first.strip()] if first.strip() else []))
        elif entries:  # a continuation of the help
            entries[-1][1].append(line.strip())
    return [
        OptionEntry(tuple(f.split()[0] for f in flags.split(", ")), " ".join(words).strip())
        for flags, words in entries
    ]


def long_options(command: str) -> set[str]:
    return {f for e in option_entries(command) for f in e.flags if f.startswith("--")}


def description(command: str) -> str:
    """The paragraph(s) between the usage block and the first argument section."""
    blocks = help_text(command).split("\n\n")
    assert blocks[0].startswith("usage: "), blocks[0]
    text = []
    for block in blocks[1:]:
        if block.startswith(("positional arguments:", "options:")):
            break
        text.append(" ".join(block.split()))
    return " ".join(text)


# -- the docs' side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """``casfs COMMAND REST`` as a doc shows it."""

    file: str
    line: int
    command: str
    rest: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: casfs {self.command} {self.rest}".rstrip()


def _invocation(file: str, line: int, text: str) -> Mention | None:
    m = INVOCATION.match(" ".join(text.split()))
    if m is None or not m.group("rest"):
        return None
    word, _, rest = m.group("rest").partition(" ")
    if word.startswith("-") or word.isupper():  # `casfs --help`, `casfs COMMAND --help`
        return None
    return Mention(file, line, word.rstrip(":,.'\""), rest)


def mentions(path: Path) -> list[Mention]:
    return mentions_in(str(path.relative_to(ROOT)), path.read_text())


def mentions_in(name: str, text: str) -> list[Mention]:
    """Every ``casfs COMMAND ...`` in a doc: commands of console blocks (``$ `` lines), of
    shell blocks (every line), and inline code spans in the prose."""
    found: list[Mention] = []
    fence: str | None = None  # the language of the open code block
    prose: list[tuple[int, str]] = []
    last_command = 0  # line of the last console command
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:].strip() or "text")
            continue
        if fence is None:
            prose.append((number, line))
            continue
        if fence == "console":
            if not stripped.startswith("$ "):
                if REFUSED.search(stripped):  # the doc shows a wrong command line on purpose
                    found = [m for m in found if m.line != last_command]
                continue  # output
            command = stripped[2:]
            last_command = number
        elif fence in ("sh", "bash", "shell"):
            if stripped.startswith("#"):
                continue
            command = stripped
        else:
            continue
        # a crontab line: the command follows the five time fields (and the user)
        command = re.sub(r"^(?:[\d*/,-]+\s+){5}(?:(?!casfs\b)\w+\s+)?", "", command)
        for piece in SHELL_SEPARATOR.split(command):
            m = _invocation(name, number, piece.strip())
            if m is not None:
                found.append(m)
    # inline code spans (they may run over a line break)
    joined = "\n".join(line for _, line in prose)
    numbers = [n for n, _ in prose]
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined):
        line = numbers[joined.count("\n", 0, m.start())]
        mention = _invocation(name, line, m.group(1).replace("\\|", "|"))
        if mention is not None:
            found.append(mention)
    return found


@dataclass
class Section:
    command: str
    text: str


def guide_sections() -> dict[str, Section]:
    """The guide's sections about one command: a heading naming `casfs COMMAND`, up to the
    next heading of the same or a higher level."""
    sections: dict[str, Section] = {}
    current: Section | None = None
    level = 0
    for line in GUIDE.read_text().splitlines():
        h = re.match(r"^(#+)\s", line)
        if h:
            m = re.match(r"^#+\s+`casfs ([a-z][a-z0-9-]*)`", line)
            if m:
                current = Section(m.group(1), "")
                level = len(h.group(1))
                sections[current.command] = current
                continue
            if current is not None and len(h.group(1)) <= level:
                current = None
        if current is not None:
            current.text += line + "\n"
    return sections


def option_rows(section: Section) -> list[tuple[str, str]]:
    """(first cell, long option) for each option of the section's options table."""
    rows = []
    for line in section.text.splitlines():
        if line.startswith("|") and not re.match(r"^\|\s*:?-", line):
            first = line.split("|")[1]
            rows += [(first.strip(), o) for o in LONG_OPTION.findall(first)]
    return rows


# -- tests ------------------------------------------------------------------------------------


def test_the_docs_are_there():
    assert GUIDE.exists(), "docs/guide.md is missing"
    assert len(mentions(ROOT / "README.md")) >= 10
    assert len(mentions(GUIDE)) >= 50


@pytest.mark.parametrize("path", docs(), ids=lambda p: p.name)
def test_every_command_in_the_docs_exists(path):
    unknown = [str(m) for m in mentions(path) if m.command not in subcommands()]
    assert not unknown, "not a casfs command (see casfs --help):\n" + "\n".join(unknown)


@pytest.mark.parametrize("path", docs(), ids=lambda p: p.name)
def test_every_long_option_in_the_docs_exists(path):
    wrong = []
    for m in mentions(path):
        if m.command not in subcommands():
            continue  # reported by the test above
        known = long_options(m.command)
        wrong += [f"{m}  ({o})" for o in LONG_OPTION.findall(m.rest) if o not in known]
    assert not wrong, "option not in that command's --help:\n" + "\n".join(wrong)


def test_the_guide_has_a_section_with_an_example_for_every_command():
    sections = guide_sections()
    missing = [c for c in subcommands() if c not in sections]
    assert not missing, f"docs/guide.md has no '## `casfs X`' section for: {missing}"
    extra = [c for c in sections if c not in subcommands()]
    assert not extra, f"docs/guide.md has sections for commands that do not exist: {extra}"
    for command, section in sections.items():
        example = re.search(rf"^\$ casfs {command}\b", section.text, re.M)
        assert example, f"docs/guide.md: the casfs {command} section shows no '$ casfs {command}'"


@pytest.mark.parametrize("command", sorted(guide_sections()) if GUIDE.exists() else [])
def test_the_guide_lists_exactly_the_options_of(command):
    section = guide_sections()[command]
    known = long_options(command) - {"--help"}
    listed = {o for _, o in option_rows(section)}
    wrong = sorted(listed - known)
    assert not wrong, f"the guide's casfs {command} section lists options it lacks: {wrong}"
    shown = set(LONG_OPTION.findall(section.text))
    undocumented = sorted(known - listed - shown)
    assert not undocumented, f"the guide's casfs {command} section omits {undocumented}"


def test_every_command_has_help_with_a_description():
    lacking = []
    for command in subcommands():
        assert help_text(command).startswith(f"usage: casfs {command} ")
        text = description(command)
        if len(text) < 40 or not text.endswith("."):
            lacking.append(f"casfs {command}: {text!r}")
    assert not lacking, "--help without a description (a sentence or more):\n" + "\n".join(lacking)


def test_every_option_has_a_help_text():
    lacking = [
        f"casfs {command} {'/'.join(e.flags)}"
        for command in subcommands()
        for e in option_entries(command)
        if not e.help
    ]
    assert not lacking, "options without a help text: " + ", ".join(lacking)


def test_the_readme_keeps_the_setup_commands():
    readme = (ROOT / "README.md").read_text()
    for command in ("bash .ci/setup demo", "bash .ci/setup test"):
        assert f"```sh\n{command}\n```" in readme, command
    assert "bash .ci/setup test" in (ROOT / ".ci" / "run").read_text()


def test_the_parsers_see_a_wrong_command_and_a_wrong_option():
    """The checks above can fail: what they parse from a doc reaches them."""
    text = (
        "```console\n$ casfs frobnicate x\nout casfs put\n$ cd /tmp && casfs stats --frob S\n"
        "$ casfs frob\ncasfs: error: argument COMMAND: invalid choice: 'frob' (...)\n```\n"
        "Run `casfs nosuch`, or\n`casfs prune\n--keep-daily 7`.\n"
    )
    found = [(m.line, m.command, m.rest) for m in mentions_in("sample.md", text)]
    assert found == [
        (2, "frobnicate", "x"),
        (4, "stats", "--frob S"),
        (8, "nosuch", ""),
        (9, "prune", "--keep-daily 7"),
    ]
    assert "frobnicate" not in subcommands() and "--frob" not in long_options("stats")
