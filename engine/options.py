"""Command-line options derived from the typed config dataclasses: each setting is written once.

A field's name, type, default and the docstring under it are its flag `--name-with-dashes`, its
value type, its default and its `--help` text. `opt(...)` in the field's metadata adds what a type
cannot say: other spellings, a negating flag, choices, a metavar, a group. A field whose type is a
dataclass becomes a help group of its own. Used by engine/cli.py and trainer/cli.py; adding a flag
is adding one documented field. `add_options(..., snake=True)` (the engine's) also takes every flag
with underscores (`--thread_count`, `--no_x` of a `--x/--no-x` switch: off, as `--no-x`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Option:
    """How one dataclass field appears on the command line (held in `field(metadata=opt(...))`)."""

    names: tuple[str, ...] = ()
    """Flag spellings, the first one shown in errors; default: `--` + the field's name with dashes."""
    negate: bool = False
    """The flag turns a default-True switch off (`--no-dedup` for `enabled`)."""
    choices: tuple | None = None
    """Values allowed; checked on the command line and by `check_choices` for the Python API."""
    metavar: str | None = None
    """Placeholder of the value in --help; default: N (int), X (float) or the field's name."""
    parse: Callable[[str], typing.Any] | None = None
    """Turns the typed text into the value; default: the field's type."""
    required: bool = False
    """The flag must be given (listed first in --help); implied for a field without a default."""
    positional: bool = False
    """Given without a flag (`shards INPUT...`)."""
    group: str | None = None
    """Help group of a nested dataclass field; default: the field's name."""
    only: tuple[str, ...] | None = None
    """Of a nested dataclass field: expose only these of its fields (the rest keep their defaults)."""


def opt(*names: str, **kw) -> dict:
    """Field metadata: `field(default=64, metadata=opt("--concurrency", "--thread-count"))`."""
    return {"cli": Option(names=names, **kw)}


def option(f: dataclasses.Field) -> Option:
    """The field's Option (a plain one when it has no metadata)."""
    return f.metadata.get("cli") or Option()


def names_of(f: dataclasses.Field) -> tuple[str, ...]:
    """Every flag spelling of a field, its main one first."""
    return option(f).names or ("--" + f.name.replace("_", "-"),)


@functools.cache
def _module_docs(path: str) -> dict[str, dict[str, str]]:
    """Class name -> {field: the docstring under its declaration} for the classes in one source file."""
    found: dict[str, dict[str, str]] = {}
    for cls in (n for n in ast.walk(ast.parse(Path(path).read_text())) if isinstance(n, ast.ClassDef)):
        docs = found.setdefault(cls.name, {})
        for decl, doc in zip(cls.body, cls.body[1:], strict=False):
            if isinstance(decl, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                docs[decl.target.id] = " ".join(str(doc.value.value).split())
    return found


def class_field_docs(source: Path, class_name: str) -> dict[str, str]:
    """{field: docstring} of one class in a source file."""
    return _module_docs(str(source)).get(class_name, {})


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of a dataclass, read from its source."""
    return class_field_docs(Path(inspect.getsourcefile(cls)), cls.__name__)


def _hints(cls: type) -> dict[str, typing.Any]:
    """The resolved type of each field (the config modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _base(tp) -> tuple[type, bool]:
    """(element type, repeatable) of a field type: `float | None` -> float, `tuple[str, ...]` -> (str, True)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def _default(f: dataclasses.Field):
    """The field's default value (a factory's product), or None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _required(f: dataclasses.Field) -> bool:
    """Whether the flag must be given: marked so, or a field without a default (not positional)."""
    o = option(f)
    no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    return o.required or (no_default and not o.positional)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A plain field of a config, nested dataclasses walked: what its flag is made from."""

    dest: str
    """Dotted name from the top class (`fetch.concurrency`): the argparse dest and build()'s key."""
    field: dataclasses.Field
    """The field itself (name, default, `opt(...)` metadata)."""
    type: typing.Any
    """Its resolved type."""
    doc: str
    """The docstring under its declaration (its --help text)."""
    group: tuple[str, str | None] | None
    """(title, description) of its --help group; None: the parser's own."""


def walk(cls: type, prefix: str = "", group: tuple[str, str | None] | None = None,
         only: tuple[str, ...] | None = None) -> Iterator[Leaf]:
    """Every plain field of `cls` on the command line, in declaration order, nested dataclasses
    (but for the fields their `only` leaves out) walked into help groups of their own."""
    hints, docs = _hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        o, tp = option(f), hints[f.name]
        if dataclasses.is_dataclass(tp):
            about = None if o.only else (tp.__doc__ or "").split("\n")[0]  # a few fields: the summary misleads
            yield from walk(tp, f"{prefix}{f.name}.", (o.group or f.name, about), o.only)
        else:
            yield Leaf(prefix + f.name, f, tp, docs.get(f.name, ""), group)


METAVARS = {int: "N", float: "X"}


class OnOff(argparse.BooleanOptionalAction):
    """`--x` / `--no-x` where every negative spelling turns the switch off: argparse's own action
    reads any spelling not starting with `--no-` as on, so a snake `--no_x` would turn it on."""

    def __init__(self, option_strings, dest, snake: bool = False, **kw):
        super().__init__(option_strings, dest, **kw)  # its help text and default; the spellings are ours
        pairs = [(s, *_negatives(s, snake)) for s in option_strings]
        self.option_strings = list(dict.fromkeys(s for pair in pairs for s in pair))
        self.negatives = {s for pair in pairs for s in pair[1:]}

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negatives)

    def format_usage(self) -> str:
        """`--x | --no-x` in the usage line; --help lists the other spellings."""
        return " | ".join(self.option_strings[:2])


def _negatives(name: str, snake: bool) -> tuple[str, ...]:
    """The off spellings of switch `name`: `--no-x-y`; `--no_x_y` too for a snake `name` or parser
    (never the half-and-half `--no-x_y`)."""
    rest = name[2:]
    dashed = () if "_" in rest else ("--no-" + rest,)
    return (dashed + (_snake("--no-" + rest),)) if snake or "_" in rest else dashed


def _snake(name: str) -> str:
    """img2dataset's spelling of a flag: `--thread-count` -> `--thread_count`."""
    return "--" + name[2:].replace("-", "_")


def _switch(container, f: dataclasses.Field, names: tuple[str, ...], dest: str, help_text: str,
            snake: bool) -> None:
    """A bool field: `--flag` turns an off one on, a `negate` flag turns an on one off, else `--x/--no-x`."""
    o, default = option(f), _default(f)
    if o.negate:  # the docstring says what the field turns on
        help_text = f"Turns off (on by default): {help_text[:1].lower()}{help_text[1:]}"
    if o.negate or default is False:
        action = "store_false" if o.negate else "store_true"
        container.add_argument(*names, dest=dest, action=action, default=default, help=help_text)
        return
    container.add_argument(*names, dest=dest, action=OnOff, default=default, help=help_text, snake=snake)


def _argument(container, leaf: Leaf, names: tuple[str, ...], snake: bool) -> None:
    """Add the one argparse argument of a plain field, under all its spellings at once."""
    f, dest, o, (elem, repeat) = leaf.field, leaf.dest, option(leaf.field), _base(leaf.type)
    help_text = leaf.doc.replace("%", "%%")
    if elem is bool:
        _switch(container, f, names, dest, help_text, snake)
        return
    kw = {"type": o.parse or elem, "default": _default(f), "help": help_text,
          "metavar": o.metavar or (None if o.choices else METAVARS.get(elem, f.name.upper()))}
    if o.choices:
        kw["choices"] = o.choices
    if o.positional:
        container.add_argument(dest, nargs="+", **kw)
        return
    if repeat:
        kw.update(action="append", default=None)  # None, not a shared list that append would grow
    container.add_argument(*names, dest=dest, required=_required(f), **kw)


def add_options(parser: argparse.ArgumentParser, cls: type, title: str | None = None, snake: bool = False) -> None:
    """Add a flag per field of `cls` (dest `field` or `part.field`); nested dataclasses become help
    groups, and with `title` the top-level fields a group of their own. `snake`: accept `--thread_count`
    wherever `--thread-count` works (img2dataset's spelling of flags)."""
    leaves = list(walk(cls, group=(title, (cls.__doc__ or "").split("\n")[0]) if title else None))
    taken = {n for leaf in leaves for n in names_of(leaf.field)}  # a snake spelling never takes another's name
    groups: dict = {None: parser}
    for leaf in leaves:
        names = names_of(leaf.field)
        if snake:
            names = tuple(dict.fromkeys(names + tuple(s for s in map(_snake, names) if s not in taken)))
        if leaf.group not in groups:
            groups[leaf.group] = parser.add_argument_group(*leaf.group)
        required = _required(leaf.field) or option(leaf.field).positional
        _argument(parser if required else groups[leaf.group], leaf, names, snake)


def build(cls: type, values: dict, prefix: str = ""):
    """The dataclass from parsed `prefix.field` values (missing ones keep their defaults); it checks itself."""
    hints, kw = _hints(cls), {}
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            kw[f.name] = build(tp, values, key + ".")
        elif key in values and not (values[key] is None and _base(tp)[1]):  # None: a repeatable flag not given
            kw[f.name] = tuple(values[key]) if typing.get_origin(tp) is tuple else values[key]
    return cls(**kw)


def from_args(cls: type, ns: argparse.Namespace):
    """The config a parsed command line stands for."""
    return build(cls, vars(ns))


def flags(cls: type) -> dict[str, tuple[str, bool]]:
    """Dotted field name -> (its main flag, whether the flag negates it), nested dataclasses included."""
    return {leaf.dest: (names_of(leaf.field)[0], option(leaf.field).negate) for leaf in walk(cls)}


def spellings(cls: type) -> dict[str, tuple[str, ...]]:
    """Dotted field name -> every flag spelling of it, nested dataclasses included."""
    return {leaf.dest: names_of(leaf.field) for leaf in walk(cls)}


def check_choices(obj) -> None:
    """Raise ValueError naming the flag when a field with `choices` holds another value (the API's check)."""
    for f in dataclasses.fields(obj):
        allowed, value = option(f).choices, getattr(obj, f.name)
        if allowed and value not in allowed and not (value is None and f.default is None):  # None: automatic
            raise ValueError(f"{names_of(f)[0]} must be one of {', '.join(map(str, allowed))}, "
                             f"got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' except for required flags and flags whose help already says the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or "default" in text or action.default in (None, argparse.SUPPRESS, [], ()):
            return text
        return super()._get_help_string(action)
