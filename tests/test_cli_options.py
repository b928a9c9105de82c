"""engine/options.py: both CLIs derived from the config dataclasses keep every flag spelling they had.

tests/assets/cli_spellings.json was dumped from the hand-written parsers before they were derived: for
each flag spelling, a command line and the config fields it set. Here the derived parsers must parse
each one to the same values, and every field must carry help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from engine import cli as engine_cli
from engine import options
from engine.config import ConditionConfig, DedupConfig, EngineConfig, PreviewConfig
from trainer.cli import build_parser, config_from_args, main
from trainer.config import TrainConfig
from trainer.generate import GenerateConfig
from trainer.generate import build_parser as generate_parser
from trainer.precompute import PrecomputeConfig
from trainer.precompute import build_parser as precompute_parser

pytestmark = pytest.mark.quick
RECORD = json.loads((Path(__file__).parent / "assets" / "cli_spellings.json").read_text())
CONFIGS = {"shards": EngineConfig, "condition": ConditionConfig, "preview": PreviewConfig, "trainer": TrainConfig,
           "generate": GenerateConfig, "precompute": PrecomputeConfig}
SUBCOMMANDS = {"generate": generate_parser, "precompute": precompute_parser}  # recorded as namespaces


def engine_parser() -> argparse.ArgumentParser:
    """`python -m engine`'s parser, as engine.cli.main builds it."""
    parser = argparse.ArgumentParser(prog="python -m engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (engine_cli.shards_parser, engine_cli.condition_parser, engine_cli.preview_parser):
        add(sub)
    return parser


def flat(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> {"fetch.concurrency": 64, ...} with JSON values (tuples as lists)."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return json.loads(json.dumps(out, default=str))


def parsed(command: str, argv: list[str]) -> dict:
    """The resolved config of a full command line, flattened, under the names the record uses."""
    if command == "trainer":
        got = flat(dataclasses.asdict(config_from_args(build_parser().parse_args(argv))))
        got["no_progress"] = not got.pop("progress")  # the record's parser kept it outside the config
        return got
    if command in SUBCOMMANDS:
        return flat(vars(SUBCOMMANDS[command]().parse_args(argv)))
    ns = engine_parser().parse_args(argv)
    got = flat(dataclasses.asdict(options.from_args(CONFIGS[command], ns)))
    if command == "condition":  # the record's namespace named the ImageConfig fields bare
        got = {k.removeprefix("image."): v for k, v in got.items()}
    return got


@pytest.mark.parametrize("command", sorted(RECORD["bases"]))
def test_base_command_lines_resolve_as_before(command):
    """With only the required arguments, every field recorded has the value it had."""
    base = RECORD["bases"][command]
    got = parsed(command, base["argv"])
    assert {k: got[k] for k in base["parsed"]} == base["parsed"]


SPELLINGS = [s for s in RECORD["spellings"] if "sets" in s]


@pytest.mark.parametrize("case", SPELLINGS, ids=[f"{s['command']} {' '.join(s['argv'][:1])}" for s in SPELLINGS])
def test_every_old_spelling_parses_to_the_same_value(case):
    """Each flag spelling of the old parsers sets the same fields to the same values, and nothing else."""
    base = RECORD["bases"][case["command"]]
    before, after = parsed(case["command"], base["argv"]), parsed(case["command"], base["argv"] + case["argv"])
    changed = {k: v for k, v in after.items() if before.get(k, "<absent>") != v}
    assert changed == case["sets"]


REFUSED = [s for s in RECORD["spellings"] if "refused" in s]


@pytest.mark.parametrize("case", REFUSED, ids=[s["argv"][0] for s in REFUSED])
def test_refused_diffusers_flags_still_refused(case, capsys):
    """diffusers' flags with no meaning here still exit 2 with the same advice."""
    with pytest.raises(SystemExit) as exc:
        main(RECORD["bases"]["trainer"]["argv"] + case["argv"])
    assert exc.value.code == 2 and case["refused"] in capsys.readouterr().err


def test_no_spelling_lost():
    """Every option string recorded is still an option string of the derived parsers."""
    subs = engine_parser()._subparsers._group_actions[0].choices
    known = {name: set(p._option_string_actions) for name, p in subs.items()}
    known["trainer"] = set(build_parser()._option_string_actions)
    known.update({name: set(make()._option_string_actions) for name, make in SUBCOMMANDS.items()})
    flags_used = {(s["command"], a) for s in RECORD["spellings"] for a in s["argv"] if a.startswith("--")}
    assert {(c, a) for c, a in flags_used if a not in known[c]} == set()


def all_fields(cls: type, prefix: str = "", only=None):
    """(dotted name, field, owning class) of every plain field on the command line, nested ones walked."""
    for f in dataclasses.fields(cls):
        tp = options._hints(cls)[f.name]
        if only is not None and f.name not in only:
            continue
        if dataclasses.is_dataclass(tp):
            yield from all_fields(tp, f"{prefix}{f.name}.", options.option(f).only)
        else:
            yield prefix + f.name, f, cls


@pytest.mark.parametrize("cls", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_field_is_a_flag_with_help(cls):
    """The CLI is derived from the dataclass: each field is a flag whose help is the field's docstring."""
    parser = argparse.ArgumentParser()
    options.add_options(parser, cls)
    by_dest = {a.dest: a for a in parser._actions}
    for name, f, owner in all_fields(cls):
        doc = options.field_docs(owner).get(f.name)
        assert doc, f"{owner.__name__}.{f.name} has no docstring"
        assert name in by_dest and by_dest[name].help, name


def test_cross_field_checks_live_in_the_owning_dataclass():
    """--near-distance is range-checked by DedupConfig itself, which the dedup index reuses."""
    from engine.dedup import DEFAULT_THRESHOLD, HammingIndex

    assert DEFAULT_THRESHOLD == DedupConfig().near_distance
    for bad in ({"near_distance": 17}, {"index_shards": 0}):
        with pytest.raises(ValueError, match="--near-distance|--index-shards"):
            DedupConfig(**bad)
    with pytest.raises(ValueError, match="--near-distance"):
        HammingIndex(17)


def test_choices_are_checked_for_the_python_api_too():
    """A value outside a field's choices is refused naming the flag, as the parser would."""
    with pytest.raises(ValueError, match="--runner must be one of"):
        EngineConfig(inputs=("x",), output="o", runner="slurm")
    with pytest.raises(ValueError, match="--resize-filter must be one of"):
        dataclasses.replace(EngineConfig(inputs=("x",), output="o").image, resize_filter="nearest")
