"""The README and the reference stay true to the command line: every flag is documented, every
command they show parses, and every link between the pages lands on a file and a heading."""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest
from conftest import ROOT

import engine

# The pages that show commands of the package as it is (docs/method.md shows none). docs/results.md
# is a log: its commands name flags that lost their experiment and left the package, each with the
# last commit that has it.
CURRENT_PAGES = ("README.md", "docs/reference.md")


def shown_commands(text: str) -> list[str]:
    """The arguments after 'python engine.py' of every command a page shows, in code blocks and in
    inline code; placeholders ('<fold>', '...', '[--features 24]') and shell redirections dropped."""
    lines = [m.group(1) for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
             for m in re.finditer(r"python engine\.py([^\n]*)", block)]
    lines += re.findall(r"`python engine\.py([^`\n]*)`", text)
    commands = []
    for line in lines:
        line = re.split(r"\s[|>&]", line)[0]  # '> train.log', '&& ...', '| tee'
        if not re.search(r"<|\.\.\.|\[", line):
            commands.append(line)
    return commands


def parse_error(words: list[str]) -> str | None:
    """argparse's complaint about ``words``, or None where they parse (--help included)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            engine.parse_args(words)
    except SystemExit as exc:
        return err.getvalue().strip().splitlines()[-1] if exc.code else None
    return None


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered -1, -2, ..."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_shown_commands_finds_commands_and_drops_placeholders():
    page = ("Run `python engine.py cv --folds 3` or `python engine.py <command> --help`.\n"
            "```bash\npython engine.py --epochs 2 > train.log   # log it\n"
            "pip install x && python engine.py data --strict\npython engine.py --preset full ...\n```\n")
    assert sorted(shown_commands(page)) == sorted([" --epochs 2", " data --strict", " cv --folds 3"])


def test_github_anchors_of_headings():
    page = "# Results\n## Where a step of the CPU preset goes (session 2)\n### `--tta on`, mirrored\n## Results\n"
    assert github_anchors(page) == {"results", "where-a-step-of-the-cpu-preset-goes-session-2", "--tta-on-mirrored",
                                    "results-1"}


@pytest.mark.parametrize("page", CURRENT_PAGES)
def test_every_command_a_page_shows_parses(page):
    commands = shown_commands((ROOT / page).read_text(encoding="utf-8"))
    assert commands, f"{page} shows no command"
    refused = {c: e for c in commands if (e := parse_error(shlex.split(c, comments=True)))}
    assert not refused, f"{page} shows commands the command line refuses: {refused}"


def test_a_refused_command_is_reported():
    # The check above can fail: a flag that left the package is refused.
    assert "unrecognized arguments: --tta" in parse_error(["evaluate", "--checkpoint", "x.pt", "--tta", "on"])


def test_every_flag_of_every_command_is_in_the_reference():
    _, commands = engine.build_parser()
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", reference))
    flags = {(name, flag) for name, parser in commands.items() for flag in engine.command_flags(parser)
             if flag != "--help"}
    assert len({flag for _, flag in flags}) > 40  # every command's flags were found
    missing = sorted(f"{name} {flag}" for name, flag in flags if flag not in documented)
    assert not missing, f"docs/reference.md does not document: {', '.join(missing)}"


def test_every_link_between_pages_lands():
    texts = {page: page.read_text(encoding="utf-8") for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]}
    anchors = {page: github_anchors(text) for page, text in texts.items()}
    broken = []
    for page, text in texts.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            landed = (page.parent / path).resolve() if path else page
            # An anchor must name a heading of one of these pages; a link to another file, only the file.
            if not landed.exists() or (anchor and landed.suffix == ".md" and anchor not in anchors.get(landed, ())):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links that land nowhere: {broken}"
