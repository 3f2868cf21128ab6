"""The README and the user guide (docs/*.md) held to the files and to the parser.

- every relative link and image points at a file of the repository, and every `#anchor`
  at a heading (GitHub's slug) or an explicit `<a id>` of its page;
- every `mnist-study` command in a fenced block parses with the real parser;
- the README's ```` ```synopsis ```` block names exactly the commands and the long options
  that the parser has;
- each command's `--help` names its guide page (`study.cli.GUIDE_PAGES`), whose section
  `` `mnist-study <command>` `` shows every flag of the command in backticks, and the README
  links to that section.

The checkers are plain functions of markdown text, tested on synthetic markdown at the end.
Nothing here starts a process but one `git ls-files` (a link to a file git ignores, such
as `runs/`, is broken in every clone).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import io
import posixpath
import re
import shlex
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from study.cli import GUIDE_PAGES, build_parser, parse_command_line
from tests.conftest import subcommands

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PROGRAM = "mnist-study"
EXTERNAL = ("http:", "https:", "mailto:")
MARKDOWN_SUFFIXES = (".md", ".markdown")
SYNOPSIS = "synopsis"
# Fewer commands than this across README.md and docs/*.md means the finder broke.
MIN_COMMANDS = 10


def markdown_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def shown(path: Path, root: Path = ROOT) -> str:
    """`path` relative to the repository, as messages name it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


# --- Blocks: fenced code and the prose around it --------------------------------------------


@dataclass(frozen=True)
class Fence:
    info: str  # the info string's first word ("toml", "synopsis"), "" for none
    line: int  # the opening fence's line number
    body: tuple[tuple[int, str], ...]  # (line number, line) inside the fences


_FENCE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[Fence]]:
    """The lines outside fenced code blocks, numbered from 1, and the blocks.

    A fence may be indented (in a list item); it closes at a line of at least as many of its
    characters, else at the end of the text (as CommonMark has it)."""
    lines = text.splitlines()
    prose: list[tuple[int, str]] = []
    fences: list[Fence] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        fence = opening["fence"] if opening else ""
        if not opening or (fence[0] == "`" and "`" in opening["info"]):
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[tuple[int, str]] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append((j + 1, lines[j]))
            j += 1
        words = opening["info"].split()
        fences.append(Fence(words[0] if words else "", i + 1, tuple(body)))
        i = j + 1
    return prose, fences


def paragraphs(prose: Iterable[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Runs of consecutive non-blank lines as (first line number, text): a code span or a
    link may wrap onto the next line, but never past a blank line or a fence."""
    start, previous = 0, -1
    chunk: list[str] = []
    for number, line in prose:
        if chunk and (not line.strip() or number != previous + 1):
            yield start, "\n".join(chunk)
            chunk = []
        if line.strip():
            if not chunk:
                start = number
            chunk.append(line)
        previous = number
    if chunk:
        yield start, "\n".join(chunk)


_BACKTICKS = re.compile(r"`+")


def code_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each inline code span, backticks included: a run of backticks opens
    one that the next run of the same length closes; a run with none is literal."""
    spans: list[tuple[int, int]] = []
    position = 0
    while (opening := _BACKTICKS.search(text, position)) is not None:
        width = len(opening.group())
        closing = next(
            (run for run in _BACKTICKS.finditer(text, opening.end()) if len(run.group()) == width),
            None,
        )
        if closing is None:
            position = opening.end()
            continue
        spans.append((opening.start(), closing.end()))
        position = closing.end()
    return spans


def mask_code_spans(text: str) -> str:
    """`text` with its code spans blanked out, every position and newline kept."""
    chars = list(text)
    for start, end in code_spans(text):
        chars[start:end] = [c if c == "\n" else " " for c in chars[start:end]]
    return "".join(chars)


# --- Headings and their anchors ------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    level: int
    text: str  # as written, markup included
    line: int
    slug: str  # GitHub's anchor, numbered if repeated


_ATX = re.compile(r"^ {0,3}(?P<hashes>#{1,6})(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*$")
_LINK_IN_HEADING = re.compile(r"(!?)\[([^\]]*)\]\([^)]*\)")
_HTML_TAG = re.compile(r"<[^>]*>")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
# `_` emphasis opens where no letter or digit precedes and closes where none follows:
# `_this_` and `__init__` are emphasis, the underscores of `n_units_l0` are not.
_UNDERSCORE_EMPHASIS = re.compile(r"(?<![^\W_])(_+)(?=\S)(.+?)(?<=\S)\1(?![^\W_])")


def _strip_markup(text: str) -> str:
    """Markdown outside code spans as GitHub renders it to plain text."""
    text = _LINK_IN_HEADING.sub(lambda m: "" if m[1] else m[2], text)
    text = _HTML_TAG.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    while (plain := _UNDERSCORE_EMPHASIS.sub(r"\2", text)) != text:
        text = plain
    return text.replace("*", "")


def plain_text(text: str) -> str:
    """A heading's text without markup; code spans keep their content as written."""
    parts: list[str] = []
    position = 0
    for start, end in code_spans(text):
        parts.append(_strip_markup(text[position:start]))
        width = len(text[start:end]) - len(text[start:end].lstrip("`"))
        code = text[start + width : end - width]
        if len(code) > 1 and code[0] == " " and code[-1] == " " and code.strip():
            code = code[1:-1]
        parts.append(code)
        position = end
    parts.append(_strip_markup(text[position:]))
    return "".join(parts)


def slug(text: str) -> str:
    """GitHub's anchor of a heading: plain text, lowercase, every character but letters,
    digits, spaces, `-` and `_` dropped, each space a hyphen."""
    plain = plain_text(text).strip().lower()
    return re.sub(r"[^\w\- ]", "", plain).replace(" ", "-")


def headings(text: str) -> list[Heading]:
    """The ATX headings outside fenced blocks, a repeated slug numbered -1, -2, ... as
    GitHub does (github-slugger)."""
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    found: list[Heading] = []
    for number, line in prose:
        match = _ATX.match(line)
        if not match:
            continue
        heading_text = (match["text"] or "").strip()
        base = result = slug(heading_text)
        while result in seen:
            seen[base] += 1
            result = f"{base}-{seen[base]}"
        seen[result] = 0
        found.append(Heading(len(match["hashes"]), heading_text, number, result))
    return found


def heading_slugs(text: str) -> list[str]:
    return [heading.slug for heading in headings(text)]


_EXPLICIT_ANCHOR = re.compile(r"<a\s[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def anchors(text: str) -> set[str]:
    """Every anchor a link may name on this page: headings' slugs and `<a id>`/`<a name>`."""
    prose, _ = split_fences(text)
    explicit = {
        match[1]
        for _, paragraph in paragraphs(prose)
        for match in _EXPLICIT_ANCHOR.finditer(mask_code_spans(paragraph))
    }
    return set(heading_slugs(text)) | explicit


def section(text: str, heading_text: str) -> tuple[Heading, str] | None:
    """The heading written `heading_text` and its section's text: the lines up to the next
    heading of the same or a higher level. None without such a heading."""
    found = headings(text)
    for i, heading in enumerate(found):
        if heading.text == heading_text:
            end = next((h.line - 1 for h in found[i + 1 :] if h.level <= heading.level), None)
            return heading, "\n".join(text.splitlines()[heading.line : end])
    return None


# --- Links --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    line: int
    markup: str  # the whole link as written, for messages
    target: str


_LABEL = r"(?:[^\[\]\\]|\\.|\[(?:[^\[\]\\]|\\.)*\])*"  # one level of nested brackets
_LINK = re.compile(
    rf"(?<!\\)!?\[(?P<label>{_LABEL})\]"
    r"\(\s*(?P<target><[^<>\n]*>|[^\s()<>]+(?:\([^\s()]*\)[^\s()<>]*)*)"
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^()]*\)))?\s*\)",
    re.S,
)


def _links_in(original: str, masked: str, start: int, end: int, first_line: int) -> Iterator[Link]:
    for match in _LINK.finditer(masked, start, end):
        line = first_line + original.count("\n", 0, match.start())
        target = original[match.start("target") : match.end("target")]
        yield Link(line, original[match.start() : match.end()], target.strip("<>"))
        # An image inside a link's text: [![alt](image.png)](page.md)
        yield from _links_in(original, masked, match.start("label"), match.end("label"), first_line)


def links(text: str) -> list[Link]:
    """The inline links and images outside fenced blocks and code spans."""
    prose, _ = split_fences(text)
    found: list[Link] = []
    for first_line, paragraph in paragraphs(prose):
        masked = mask_code_spans(paragraph)
        found.extend(_links_in(paragraph, masked, 0, len(masked), first_line))
    return sorted(found, key=lambda link: link.line)


@functools.cache
def repository_files(root: Path = ROOT) -> frozenset[str] | None:
    """The files a clone has, and folders above them: tracked, or new and not ignored (the
    guide's pages before their commit). None where git cannot say (no git, no repository)."""
    try:
        listed = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    files = {name for name in listed.split("\0") if name}
    folders = {str(parent) for name in files for parent in Path(name).parents if str(parent) != "."}
    return frozenset(files | folders)


def _link_problem(
    page: Path,
    target: str,
    root: Path,
    files: frozenset[str] | None,
    anchors_of: dict[Path, set[str]],
) -> str | None:
    if target.lower().startswith(EXTERNAL):
        return None
    address, hash_sign, anchor = target.partition("#")
    address, anchor = unquote(address), unquote(anchor)
    if address.startswith("/"):  # GitHub: from the repository's root
        destination = root / address.lstrip("/")
    else:
        destination = page.parent / address if address else page
    destination = destination.resolve()
    if not destination.is_relative_to(root):
        return "points outside the repository"
    name = destination.relative_to(root).as_posix()
    if not destination.exists():
        return f"no such file: {name}"
    if files is not None and destination != root and name not in files:
        return f"{name} is ignored by git, so no clone has it"
    if not hash_sign or not anchor:
        return None
    if destination.is_dir() or destination.suffix.lower() not in MARKDOWN_SUFFIXES:
        return f"#{anchor} on {name}, which is not a markdown page"
    if destination not in anchors_of:
        anchors_of[destination] = anchors(destination.read_text(encoding="utf-8"))
    known = anchors_of[destination]
    if anchor in known:
        return None
    close = difflib.get_close_matches(anchor, sorted(known), n=1)
    return f"no heading #{anchor} in {name}" + (f" (did you mean #{close[0]}?)" if close else "")


def broken_links(path: Path, root: Path = ROOT, files: frozenset[str] | None = None) -> list[str]:
    """One line per broken relative link of the page: `file:line: [text](target): why`.
    `files`: what a clone has (`repository_files`); None: whatever exists here."""
    root = root.resolve()
    page = path.resolve()
    anchors_of: dict[Path, set[str]] = {}
    problems = []
    for link in links(path.read_text(encoding="utf-8")):
        problem = _link_problem(page, link.target, root, files, anchors_of)
        if problem:
            markup = " ".join(link.markup.split())  # a link may wrap
            problems.append(f"{shown(path, root)}:{link.line}: {markup}: {problem}")
    return problems


# --- Commands in fenced blocks ---------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    line: int
    text: str  # as written, continuation lines joined
    argv: tuple[str, ...] | None  # the words after the program; None: it does not split
    error: str = ""  # why it does not split


_ASSIGNMENT = r"[A-Za-z_][A-Za-z0-9_]*=(?:'[^']*'|\"[^\"]*\"|[^\s'\"])*\s+"
# A command's line: after an optional `$ ` prompt, `exec` or variable assignments, the
# program: `mnist-study` (or `python -m study`, the same), with or without a folder.
_COMMAND_START = re.compile(
    rf"^(?:\$\s+)?(?:exec\s+)?(?:{_ASSIGNMENT})*"
    rf"(?P<program>(?:\S*/)?(?:{re.escape(PROGRAM)}|python3?\s+-m\s+study))\s+(?P<rest>.*)$"
)
_OPERATORS = set(";&|<>")


def split_command(text: str) -> list[str]:
    """The words of a shell command line as `shlex.split(text, comments=True)` has them,
    up to the first control operator or redirection (`|`, `&&`, `;`, `>`, `&`).
    ValueError for an open quote or a trailing backslash."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars="".join(sorted(_OPERATORS)))
    lexer.whitespace_split = True
    words: list[str] = []
    for word in lexer:
        if set(word) <= _OPERATORS:
            break
        words.append(word)
    return words


def _command_start(line: str) -> str | None:
    """From the program on, where the line starts a command, else None. A line such as
    `mnist-study run: error: ...` is the program's output, not a command."""
    match = _COMMAND_START.match(line.strip())
    if not match or match["rest"].split(maxsplit=1)[0].endswith(":"):
        return None
    return line.strip()[match.start("program") :]


def fenced_commands(text: str) -> list[Command]:
    """Every command in the fenced blocks but the synopsis, continuation lines joined: a
    trailing backslash, and a quote left open (a JSON `--params '{...` over lines)."""
    _, fences = split_fences(text)
    found: list[Command] = []
    for fence in fences:
        if fence.info == SYNOPSIS:
            continue
        body = fence.body
        i = 0
        while i < len(body):
            number, line = body[i]
            command = _command_start(line)
            if command is None:
                i += 1
                continue
            argv: tuple[str, ...] | None = None
            error = ""
            while True:
                if command.rstrip().endswith("\\") and i + 1 < len(body):
                    i += 1
                    command = command.rstrip()[:-1] + " " + body[i][1].strip()
                    continue
                try:
                    words = split_command(command)
                except ValueError as exc:
                    if i + 1 < len(body):
                        i += 1
                        command += "\n" + body[i][1]
                        continue
                    error = f"does not split ({exc})"
                else:
                    # Drop the program: `mnist-study`, or `python -m study`'s three words.
                    argv = tuple(
                        words[3:] if words[0].split("/")[-1].startswith("python") else words[1:]
                    )
                break
            found.append(Command(number, command, argv, error))
            i += 1
    return found


def parse_problem(argv: Iterable[str]) -> str | None:
    """What the real parser says about the command, None if it takes it. `--help` (exit 0)
    is taken."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(captured):
            parse_command_line(list(argv))
    except SystemExit as exc:
        if exc.code in (0, None):
            return None
        return captured.getvalue().strip() or f"exit status {exc.code}"
    return None


def command_problems(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for command in fenced_commands(path.read_text(encoding="utf-8")):
        why = command.error if command.argv is None else parse_problem(command.argv)
        if why:
            one_line = " ".join(command.text.split())
            problems.append(f"{shown(path, root)}:{command.line}: {one_line}\n    {why}")
    return problems


# --- The parser's commands and options ------------------------------------------------------


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    """The long options a user is shown: not `--help`, nor those of suppressed help."""
    return {
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")  # a bare `--` (sbatch's) is not one


def synopsis_entries(text: str) -> tuple[list[tuple[int, str, str]], list[str]]:
    """The ```` ```synopsis ```` blocks' entries as (line, command, text) and the problems:
    no such block, or more than one, and lines that belong to no entry. An entry starts
    `mnist-study <command>`; lines indented more belong to it."""
    blocks = [fence for fence in split_fences(text)[1] if fence.info == SYNOPSIS]
    if len(blocks) != 1:
        return [], [f"{len(blocks)} ```{SYNOPSIS} blocks, not 1"]
    entries: list[tuple[int, str, str]] = []
    problems: list[str] = []
    indent = 0
    for number, line in blocks[0].body:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        words = line.split()
        if words[0] == PROGRAM and len(words) > 1 and (not entries or depth <= indent):
            entries.append((number, words[1], line))
            indent = depth
        elif entries and depth > indent:
            entries[-1] = (entries[-1][0], entries[-1][1], entries[-1][2] + "\n" + line)
        else:
            problems.append(f"line {number} belongs to no command: {line.strip()}")
    return entries, problems


def named_options(entry: str) -> set[str]:
    return set(_OPTION.findall(entry))


def undocumented(options: Iterable[str], text: str) -> list[str]:
    """The options that `text` never shows in backticks: `--n-trials N`, `--n-trials=N`,
    `--n-trials[...` or `--n-trials` right after the opening backtick."""
    return sorted(
        option for option in options if not re.search(rf"`{re.escape(option)}[ =\[`]", text)
    )


# --- The real files -----------------------------------------------------------------------

PARSER = build_parser()
COMMANDS = subcommands(PARSER)
MARKDOWN = markdown_files()


def _ids(paths: Iterable[Path]) -> list[str]:
    return [shown(path) for path in paths]


def _report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", MARKDOWN, ids=_ids(MARKDOWN))
def test_links_resolve(path: Path) -> None:
    problems = broken_links(path, ROOT, repository_files(ROOT))
    assert not problems, _report(problems, "broken links")


@pytest.mark.parametrize("path", MARKDOWN, ids=_ids(MARKDOWN))
def test_fenced_commands_parse(path: Path) -> None:
    problems = command_problems(path)
    assert not problems, _report(problems, "commands the parser refuses")


def test_the_docs_hold_commands_to_parse() -> None:
    found = sum(len(fenced_commands(path.read_text(encoding="utf-8"))) for path in MARKDOWN)
    assert found >= MIN_COMMANDS, (
        f"{found} commands in the fenced blocks of {', '.join(_ids(MARKDOWN))}: "
        f"at least {MIN_COMMANDS} expected, so the finder may be broken"
    )


def test_synopsis_names_the_commands_and_their_options() -> None:
    entries, problems = synopsis_entries(README.read_text(encoding="utf-8"))
    named = [command for _, command, _ in entries]
    if named != list(COMMANDS):
        problems.append(f"commands {named}, the parser's {list(COMMANDS)}")
    for line, command, entry in entries:
        if command not in COMMANDS:
            continue
        wanted, written = long_options(COMMANDS[command]), named_options(entry)
        if missing := sorted(wanted - written):
            problems.append(f"README.md:{line}: {command}: missing {', '.join(missing)}")
        if extra := sorted(written - wanted):
            problems.append(f"README.md:{line}: {command}: no such options {', '.join(extra)}")
    assert not problems, _report(problems, "differences between the synopsis and the parser")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_names_the_guide_page_that_explains_every_flag(command: str) -> None:
    assert command in GUIDE_PAGES, f"study.cli.GUIDE_PAGES has no page for {command}"
    page = GUIDE_PAGES[command]
    help_text = COMMANDS[command].format_help()
    assert page in "".join(help_text.split()), f"`{PROGRAM} {command} --help` never names {page}"
    assert (ROOT / page).is_file(), f"{page}, the guide page of {command}, does not exist"
    heading = f"`{PROGRAM} {command}`"
    found = section((ROOT / page).read_text(encoding="utf-8"), heading)
    assert found is not None, f"{page} has no heading {heading}"
    start, text = found
    missing = undocumented(long_options(COMMANDS[command]), text)
    assert not missing, (
        f"{page}:{start.line}: section {heading} never shows in backticks "
        f"{len(missing)} of its flags: {', '.join(missing)}"
    )


def test_readme_links_each_command_to_its_section() -> None:
    targets = {posixpath.normpath(link.target) for link in links(README.read_text("utf-8"))}
    missing = [
        f"{page}#{PROGRAM}-{command}"
        for command, page in GUIDE_PAGES.items()
        if f"{posixpath.normpath(page)}#{PROGRAM}-{command}" not in targets
    ]
    assert not missing, "README.md never links to " + ", ".join(missing)


# --- The checkers, on synthetic markdown ---------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("The search space", "the-search-space"),
        ("`mnist-study run`", "mnist-study-run"),
        ("Many hosts: one PostgreSQL database", "many-hosts-one-postgresql-database"),
        ("`n_units_l0` and n_units_l1", "n_units_l0-and-n_units_l1"),
        ("The _wide_ space, **fast**", "the-wide-space-fast"),
        ("`__init__` and __init__", "__init__-and-init"),
        ("Errors and exit codes (1, 2, 130)", "errors-and-exit-codes-1-2-130"),
        ("See [the budget](#the-budget) — twice", "see-the-budget--twice"),
        ("Stacking: 1.10–1.12× one trial", "stacking-110112-one-trial"),
    ],
)
def test_slug_is_githubs(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_repeated_headings_get_numbered_slugs_and_fenced_lines_are_not_headings() -> None:
    text = (
        "# Guide\n## Presets\n### Presets\n```sh\n# Presets\n```\n"
        "## Presets ##\n## Presets-1\n    # indented code\n"
    )
    assert heading_slugs(text) == ["guide", "presets", "presets-1", "presets-2", "presets-1-1"]
    assert [h.level for h in headings(text)] == [1, 2, 3, 2, 2]


def test_section_ends_at_a_heading_of_the_same_level() -> None:
    text = "# Guide\n## `mnist-study run`\nx\n### Sub\ny\n## Next\nz\n"
    found = section(text, "`mnist-study run`")
    assert found is not None
    heading, body = found
    assert (heading.line, heading.slug, body) == (2, "mnist-study-run", "x\n### Sub\ny")
    assert section(text, "`mnist-study worker`") is None


def _write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_broken_file_links_and_anchors_are_reported_good_ones_not(tmp_path: Path) -> None:
    _write(tmp_path, "docs/running.md", "# Running\n## `mnist-study run`\n<a id='old-name'></a>\n")
    _write(tmp_path, "docs/images/curve.png", "")
    readme = _write(
        tmp_path,
        "README.md",
        "# Top\n"
        "[run](docs/running.md#mnist-study-run) and [old](docs/running.md#old-name)\n"
        '![curve](docs/images/curve.png "the curve") [top](#top) [web](https://x.org/#y)\n'
        "[gone](docs/gone.md) and\n"
        "[bad anchor](docs/running.md#mnist-study-rn)\n"
        "[self](#nowhere) [out](../elsewhere.md) [png anchor](docs/images/curve.png#a)\n"
        "[a link that\nwraps](docs/missing.md)\n",
    )
    assert broken_links(readme, tmp_path) == [
        "README.md:4: [gone](docs/gone.md): no such file: docs/gone.md",
        "README.md:5: [bad anchor](docs/running.md#mnist-study-rn): no heading "
        "#mnist-study-rn in docs/running.md (did you mean #mnist-study-run?)",
        "README.md:6: [self](#nowhere): no heading #nowhere in README.md",
        "README.md:6: [out](../elsewhere.md): points outside the repository",
        "README.md:6: [png anchor](docs/images/curve.png#a): #a on docs/images/curve.png, "
        "which is not a markdown page",
        "README.md:7: [a link that wraps](docs/missing.md): no such file: docs/missing.md",
    ]
    page = tmp_path / "docs/running.md"
    _write(tmp_path, "docs/guide.md", "[back](../README.md#top) [run](running.md) [up](/README.md)")
    assert broken_links(tmp_path / "docs/guide.md", tmp_path) == []
    assert broken_links(page, tmp_path) == []


def test_a_link_to_a_file_git_ignores_is_broken(tmp_path: Path) -> None:
    readme = _write(tmp_path, "README.md", "[page](runs/index.html) [ok](docs/a.md)\n")
    _write(tmp_path, "runs/index.html", "")
    _write(tmp_path, "docs/a.md", "")
    assert broken_links(readme, tmp_path, frozenset({"README.md", "docs", "docs/a.md"})) == [
        "README.md:1: [page](runs/index.html): runs/index.html is ignored by git, so no clone "
        "has it"
    ]


def test_links_inside_code_are_ignored(tmp_path: Path) -> None:
    text = (
        "`[a](gone1.md)` and ``[b](gone2.md) ` `` and `two\nlines [c](gone3.md)`\n\n"
        "```\n[d](gone4.md)\n```\n"
        "  ~~~markdown\n  ![e](gone5.png)\n  ~~~\n"
        "[`mnist-study run`](real.md#mnist-study-run) [f](real.md)\n"
    )
    assert [(link.line, link.target) for link in links(text)] == [
        (10, "real.md#mnist-study-run"),
        (10, "real.md"),
    ]
    readme = _write(tmp_path, "README.md", text)
    _write(tmp_path, "real.md", "## `mnist-study run`\n")
    assert broken_links(readme, tmp_path) == []


def test_an_image_inside_a_link_is_checked_too() -> None:
    assert [link.target for link in links("[![badge](img/b.svg)](docs/a.md)")] == [
        "docs/a.md",
        "img/b.svg",
    ]


def test_a_bad_flag_in_a_fenced_block_is_found_and_refused(tmp_path: Path) -> None:
    text = (
        "Run it:\n\n```sh\n$ mnist-study run --frobnicate\nmnist-study status --json\n```\n"
        "mnist-study run --frobnicate outside a block is prose\n"
    )
    commands = fenced_commands(text)
    assert [(c.line, c.argv) for c in commands] == [
        (4, ("run", "--frobnicate")),
        (5, ("status", "--json")),
    ]
    problem = parse_problem(commands[0].argv or ())
    assert problem is not None and "unrecognized arguments: --frobnicate" in problem
    assert parse_problem(commands[1].argv or ()) is None
    page = _write(tmp_path, "docs/page.md", text)
    (message,) = command_problems(page, tmp_path)
    assert message.startswith("docs/page.md:4: mnist-study run --frobnicate\n    mnist-study run:")


def test_continued_commands_are_joined() -> None:
    text = (
        "```\n"
        'mnist-study train --preset quick --params \'{"n_layers": 2,\n'
        '  "n_units_l0": 300, "activation": "relu"}\' --json\n'
        "mnist-study run --preset quick \\\n"
        "    --workers 2 -- --partition=gpu   # a comment\n"
        "mnist-study run --preset quick --slurm \\\n"
        "    --dry-run -- --partition=gpu\n"
        "MNIST_STUDY_STORAGE=sqlite:///x.db mnist-study status | head -3\n"
        "exec /venv/bin/python -m study worker --study s --each-gpu\n"
        "mnist-study run: error: unrecognized arguments: --frobnicate\n"
        'mnist-study train --params \'{"open": \n'
        "```\n"
    )
    commands = fenced_commands(text)
    assert [(c.line, c.argv) for c in commands] == [
        (
            2,
            (
                "train",
                "--preset",
                "quick",
                "--params",
                '{"n_layers": 2,\n  "n_units_l0": 300, "activation": "relu"}',
                "--json",
            ),
        ),
        (4, ("run", "--preset", "quick", "--workers", "2", "--", "--partition=gpu")),
        (6, ("run", "--preset", "quick", "--slurm", "--dry-run", "--", "--partition=gpu")),
        (8, ("status",)),
        (9, ("worker", "--study", "s", "--each-gpu")),
        (11, None),
    ]
    assert "No closing quotation" in commands[-1].error
    assert [parse_problem(c.argv) is None for c in commands[:-1] if c.argv is not None] == [
        True,
        False,  # sbatch options after `--` need --slurm
        True,
        True,
        True,
    ]


def test_a_synopsis_block_is_not_commands_but_the_synopsis() -> None:
    text = (
        "```synopsis\n"
        "mnist-study data    [--root DIR] [--refetch]\n"
        "mnist-study run     [--preset P] [--n-trials N]\n"
        "                    [--slurm [--tasks N] [-- SBATCH OPTIONS]]\n"
        "mnist-study retrain [--ensemble | --no-ensemble]\n"
        "stray line\n"
        "```\n"
    )
    assert fenced_commands(text) == []
    entries, problems = synopsis_entries(text)
    assert [(line, command) for line, command, _ in entries] == [
        (2, "data"),
        (3, "run"),
        (5, "retrain"),
    ]
    assert [named_options(entry) for _, _, entry in entries] == [
        {"--root", "--refetch"},
        {"--preset", "--n-trials", "--slurm", "--tasks"},
        {"--ensemble", "--no-ensemble"},
    ]
    assert problems == ["line 6 belongs to no command: stray line"]
    assert synopsis_entries("```\nmnist-study data\n```\n") == ([], ["0 ```synopsis blocks, not 1"])


def test_the_parser_options_leave_out_help_and_hidden_ones() -> None:
    assert {"--ensemble", "--no-ensemble"} <= long_options(COMMANDS["retrain"])
    worker = long_options(COMMANDS["worker"])
    assert "--study" in worker
    assert not {"--help", "--worker-id", "--parent-pid", "--deadline"} & worker


def test_a_flag_counts_as_explained_only_in_backticks() -> None:
    text = (
        "| `--n-trials N` | the budget |\n| `--slurm`, `--tasks N` | cluster |\n"
        "`--out=DIR` and `--params[...]`, but --timeout bare and `--seed-x` longer\n"
    )
    options = ["--n-trials", "--slurm", "--tasks", "--out", "--params", "--timeout", "--seed"]
    assert undocumented(options, text) == ["--seed", "--timeout"]
