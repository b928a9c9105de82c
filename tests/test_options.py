"""engine/options.py: on/off switches, whatever the spelling, go the way the spelling says.

argparse's BooleanOptionalAction reads every spelling that does not start with `--no-` as "on", so
a snake `--no_x` alias of its own would turn the switch on. Here a switch built with snake spellings
is parsed under each of them, and every switch of the real parsers under each of its spellings.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from engine import options
from engine.options import opt
from tests.test_cli_options import RECORD, SUBCOMMANDS, engine_parser
from trainer.cli import build_parser

pytestmark = pytest.mark.quick


@dataclass
class Switches:
    """Default-on switches: `--x/--no-x` flags."""

    fast_path: bool = True
    """Take the fast path."""
    x: bool = True
    """A one-word switch."""
    resume_run: bool = field(default=True, metadata=opt("--resume-run", "--resume_run"))
    """A switch with an explicit snake alias (as trainer/config.py's diffusers spellings)."""


def parse(argv: list[str], snake: bool) -> argparse.Namespace:
    """Switches parsed from argv by a parser with (or without) img2dataset's snake spellings."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    options.add_options(parser, Switches, snake=snake)
    return parser.parse_args(argv)


@pytest.mark.parametrize(("flag", "on"), [
    ("--fast-path", True), ("--fast_path", True), ("--no-fast-path", False), ("--no_fast_path", False),
    ("--x", True), ("--no-x", False), ("--no_x", False),
    ("--resume-run", True), ("--resume_run", True), ("--no-resume-run", False), ("--no_resume_run", False),
])
def test_snake_spellings_of_a_switch_go_its_way(flag, on):
    """Off by a negative spelling, on by a positive one, from the default and after the opposite."""
    dest = next(d for d in ("fast_path", "x", "resume_run") if flag.replace("_", "-").endswith(d.replace("_", "-")))
    assert vars(parse([flag], snake=True))[dest] is on
    opposite = flag.replace("--no-", "--").replace("--no_", "--") if not on else "--no-" + dest.replace("_", "-")
    assert vars(parse([opposite, flag], snake=True))[dest] is on
    assert vars(parse([], snake=True))[dest] is True


def test_without_snake_spellings_only_a_snake_alias_gets_a_snake_negative():
    """A plain parser: `--no_x` is no flag at all (not `--x`); an explicit `--resume_run` alias is
    turned off by `--no_resume_run`; the half-and-half `--no-resume_run` exists on neither parser."""
    assert parse(["--no_resume_run"], snake=False).resume_run is False
    for argv, snake in ((["--no_x"], False), (["--no_fast_path"], False), (["--no-resume_run"], True)):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            parse(argv, snake)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser built with engine.options: the engine's subcommands, the trainer, precompute, generate."""
    found = dict(engine_parser()._subparsers._group_actions[0].choices)
    found["trainer"] = build_parser()
    found.update({name: make() for name, make in SUBCOMMANDS.items()})
    return found


@pytest.mark.parametrize(("command", "parser"), list(parsers().items()), ids=list(parsers()))
def test_every_switch_spelling_sets_what_its_main_spelling_sets(command, parser):
    """Each spelling of each flag that takes no value sets its field as the main spelling does;
    of a --x/--no-x switch, every spelling that reads `--no-` with dashes turns it off, the rest on."""
    base = RECORD["bases"][command]["argv"]
    base = base[1:] if parser.prog.startswith("python -m engine") else base  # a subparser: no command word
    for action in parser._actions:
        if action.nargs != 0 or not action.option_strings or action.dest == "help":
            continue
        main = getattr(parser.parse_args([*base, action.option_strings[0]]), action.dest)
        for spelling in action.option_strings:
            got = getattr(parser.parse_args([*base, spelling]), action.dest)
            if isinstance(action, argparse.BooleanOptionalAction):
                assert got is not spelling.replace("_", "-").startswith("--no-"), (command, spelling)
            else:
                assert got == main, (command, spelling)
