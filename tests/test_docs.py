"""The README and docs/ are tested like code: every documented command parses, every link resolves.

Each command line in a fenced code block (and each inline `python ...` span) of README.md and docs/*.md that runs
`python main_cache_model.py`, `python benchmark.py`, `python benchmark_original.py`, `python bench/<script>.py` or
`python -m ewq.<module>` is run through that entry point exactly as `python ...` would run it (runpy, with sys.argv
set), and stopped the moment its argparse parser has parsed the arguments: a flag that does not exist, a wrong
choice value or a missing required argument fails here; no model is loaded and nothing is written. Placeholders
such as PLAN or quantized_models/<name>-<hash> are fine wherever the parser takes a free string.
`make X` must be a target of the Makefile, and the README's set-up block must be exactly `make demo` and `make test`.
Every flag of the user-facing commands must be described in docs/reference.md (the service's: docs/service.md).
"""

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README] + DOCS
# docs/RESULTS.md is the record of what was run, with the commands as they were run then (some elided with "...");
# its links are checked, its commands are not: the pages a user follows are.
COMMAND_PAGES = [p for p in PAGES if p.name != "RESULTS.md"]

SCRIPTS = ("main_cache_model.py", "benchmark.py", "benchmark_original.py")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w.+-]*)")
NOT_SHELL = {"python", "py", "json", "yaml", "toml", "text", "txt", "console-output"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_fences(text: str):
    """(prose lines, [(language, [code lines])]) of a markdown page."""
    prose, blocks, fence, lang, code = [], [], None, "", []
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang, code = m.group(1), m.group(2).lower(), []
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((lang, code))
            fence = None
        elif fence is not None:
            code.append(line)
        else:
            prose.append(line)
    return prose, blocks


def logical_lines(lines):
    """Shell lines with backslash continuations joined."""
    out, buf = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    if buf:
        out.append(buf)
    return out


def commands_in(tokens):
    """Each command of a shell line, split at &&, ;, |."""
    cmd = []
    for t in tokens:
        if t in SHELL_OPERATORS:
            if cmd:
                yield cmd
            cmd = []
        else:
            cmd.append(t)
    if cmd:
        yield cmd


def entry_point(cmd):
    """('script', path, args), ('module', name, args), ('make', target, []) or None for other commands."""
    for i, tok in enumerate(cmd):
        name = tok.rsplit("/", 1)[-1]
        if re.fullmatch(r"python(3(\.\d+)?)?", name) and i + 1 < len(cmd):
            nxt, rest = cmd[i + 1], cmd[i + 2:]
            if nxt == "-m" and rest and rest[0].split(".")[0] == "ewq":
                return "module", rest[0], rest[1:]
            if nxt in SCRIPTS or re.fullmatch(r"bench/\w+\.py", nxt):
                return "script", nxt, rest
            return None
        if name == "make" and i + 1 < len(cmd):
            return "make", cmd[i + 1], []
    return None


def tokenize(line: str):
    """The words of a shell line, with &&, ||, ;, | as words of their own."""
    line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment
    words = []
    for part in re.split(r"(&&|\|\||;|\|)", line):
        if part in SHELL_OPERATORS:
            words.append(part)
            continue
        try:
            words += shlex.split(part)
        except ValueError:  # an apostrophe in prose, not a command of ours
            words += part.split()
    return words


def documented_commands():
    """(page, the line as written, (kind, target, args, whether it is an inline mention in prose))."""
    found = []
    for page in COMMAND_PAGES:
        prose, blocks = split_fences(page.read_text(encoding="utf-8"))
        lines = [(ln, False) for lang, code in blocks if lang not in NOT_SHELL for ln in logical_lines(code)]
        lines += [(span, True) for ln in prose for span in re.findall(r"`([^`]+)`", ln)
                  if re.match(r"(\S*/)?python3? ", span)]
        for line, mention in lines:
            for cmd in commands_in(tokenize(line)):
                entry = entry_point(cmd)
                if entry:
                    found.append((rel(page), line.strip(), entry + (mention,)))
    return found


COMMANDS = documented_commands()


class Parsed(BaseException):
    """Raised from inside parse_args once the arguments parsed: the entry point goes no further."""

    def __init__(self, parser, namespace):
        super().__init__()
        self.parser, self.namespace = parser, namespace


def parse_with_entry_point(kind: str, target: str, args):
    """Run `python target args` (or `python -m target args`) up to its argument parsing; return (parser, namespace)
    or raise AssertionError with the parser's own error message."""
    real_parse_args = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):
        ns = real_parse_args(self, args, namespace)
        raise Parsed(self, ns)

    argv0 = str(ROOT / target) if kind == "script" else target
    old_argv, old_path = sys.argv, list(sys.path)
    stderr = io.StringIO()
    argparse.ArgumentParser.parse_args = stop_after_parsing
    sys.argv = [argv0] + list(args)
    if kind == "script":
        sys.path.insert(0, str((ROOT / target).parent))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if kind == "script":
                runpy.run_path(str(ROOT / target), run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except Parsed as p:
        return p.parser, p.namespace
    except SystemExit as e:
        if e.code in (0, None):  # --help
            return None, None
        raise AssertionError(f"exit {e.code}: {stderr.getvalue().strip()}") from None
    finally:
        argparse.ArgumentParser.parse_args = real_parse_args
        sys.argv, sys.path[:] = old_argv, old_path
    raise AssertionError(f"{target} returned without parsing its arguments")


def makefile_targets():
    return set(re.findall(r"^([\w.-]+)\s*:", (ROOT / "Makefile").read_text(), flags=re.M))


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 30, "the command extractor found almost nothing: is the markdown parsing broken?"
    pages = {page for page, _, _ in COMMANDS}
    assert "README.md" in pages


@pytest.mark.parametrize("page,line,entry", COMMANDS, ids=[f"{p}: {ln[:90]}" for p, ln, _ in COMMANDS])
def test_documented_command_parses(page, line, entry):
    kind, target, args, mention = entry
    if kind == "make":
        assert target in makefile_targets(), f"{page}: `make {target}` is not a Makefile target"
        return
    if kind == "script":
        assert (ROOT / target).is_file(), f"{page}: {target} does not exist"
        if target.startswith("bench/") and "ArgumentParser" not in (ROOT / target).read_text(encoding="utf-8"):
            # a bench script without a parser would run for real: never run it here
            assert not args, f"{page}: `{line}`: {target} takes no arguments"
            return
    try:
        parse_with_entry_point(kind, target, args)
    except AssertionError as e:
        if mention and "arguments are required" in str(e):
            return  # prose naming a command (`python -m ewq.export gguf`) need not give its required arguments
        pytest.fail(f"{page}: `{line}` does not parse: {e}")


def test_readme_setup_is_make_demo_and_make_test():
    """The two set-up commands; CI runs `make test`, the README's test command."""
    _, blocks = split_fences(README.read_text(encoding="utf-8"))
    makes = [[cmd for ln in logical_lines(code) for cmd in commands_in(tokenize(ln))]
             for _, code in blocks]
    setup = [cmds for cmds in makes if cmds and all(c[0] == "make" for c in cmds)]
    assert setup == [[["make", "demo"], ["make", "test"]]], setup
    makefile = (ROOT / "Makefile").read_text()
    assert {"demo", "test"} <= makefile_targets()
    assert re.search(r"^test:.*\n\t\$\(PY\) -m pytest", makefile, flags=re.M), "make test must run the test suite"


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    return {slug(m.group(2)) for ln in prose if (m := re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", ln))}


def links():
    found = []
    for page in PAGES:
        prose, _ = split_fences(page.read_text(encoding="utf-8"))
        for ln in prose:
            ln = re.sub(r"`[^`]*`", "", ln)
            for target in LINK.findall(ln):
                if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    found.append((page, target))
    return found


LINKS = links()


@pytest.mark.parametrize("page,target", LINKS, ids=[f"{rel(p)} -> {t}" for p, t in LINKS])
def test_relative_link_resolves(page, target):
    path, _, fragment = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{rel(page)} links to {target}, which does not exist"
    if fragment and dest.suffix == ".md":
        assert fragment in anchors(dest), f"{rel(page)} links to {target}: {rel(dest)} has no heading #{fragment}"


def test_the_pages_are_linked_from_the_readme():
    text = README.read_text(encoding="utf-8")
    for page in DOCS:
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def test_readme_fits_one_screen_of_map():
    assert len(README.read_text(encoding="utf-8").splitlines()) < 150


# (entry point, the arguments it needs to parse, the page that describes its flags)
USER_COMMANDS = [("script", "main_cache_model.py", [], "reference.md"), ("script", "benchmark.py", [], "reference.md"),
                 ("script", "benchmark_original.py", [], "reference.md"),
                 ("module", "ewq.export", ["gguf", "--plan", "P", "--out", "O"], "reference.md"),
                 ("module", "ewq.report", [], "reference.md"), ("module", "ewq.status", [], "reference.md"),
                 ("module", "ewq.demo", [], "reference.md"), ("module", "ewq.serve", ["--model", "M"], "service.md")]


@pytest.mark.parametrize("kind,target,args,page", USER_COMMANDS, ids=[e[1] for e in USER_COMMANDS])
def test_every_flag_is_documented(kind, target, args, page):
    """A new flag gets a line in its page (docs/reference.md, or docs/service.md for the service)."""
    parser, ns = parse_with_entry_point(kind, target, args)
    reference = (ROOT / "docs" / page).read_text(encoding="utf-8")
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    for action in parser._actions:  # subcommands (ewq.export gguf)
        if isinstance(action, argparse._SubParsersAction):
            flags |= {s for sub in action.choices.values() for a in sub._actions for s in a.option_strings
                      if s.startswith("--") and s != "--help"}
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", reference))
    assert not missing, f"{target}: flags not described in docs/{page}: {missing}; add a line for each"
