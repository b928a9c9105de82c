"""Command-line options derived from the typed config dataclasses: each setting is written once.

A field's name, type, default and the docstring under it are its flag `--name-with-dashes`, its
value type, its default and its `--help` text. `opt(...)` in the field's metadata adds what a type
cannot say: other spellings, a negating flag, choices, a metavar, a group. A field whose type is a
dataclass becomes a help group of its own. Used by engine/cli.py and trainer/cli.py; adding a flag
is adding one documented field.
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
from collections.abc import Callable
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


METAVARS = {int: "N", float: "X"}


def _switch(container, f: dataclasses.Field, dest: str, help_text: str) -> None:
    """A bool field: `--flag` turns an off one on, a `negate` flag turns an on one off, else `--x/--no-x`."""
    o, default, names = option(f), _default(f), names_of(f)
    if o.negate:  # the docstring says what the field turns on
        help_text = f"Turns off (on by default): {help_text[:1].lower()}{help_text[1:]}"
    if o.negate or default is False:
        action = "store_false" if o.negate else "store_true"
        container.add_argument(*names, dest=dest, action=action, default=default, help=help_text)
        return
    container.add_argument(names[0], dest=dest, action=argparse.BooleanOptionalAction, default=default,
                           help=help_text)
    _alias(container, names[1:], names[0])


def _argument(container, f: dataclasses.Field, tp, dest: str, doc: str) -> None:
    """Add the one argparse argument of a plain field."""
    o, (elem, repeat) = option(f), _base(tp)
    help_text = (doc or "").replace("%", "%%")
    if elem is bool:
        _switch(container, f, dest, help_text)
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
    container.add_argument(*names_of(f), dest=dest, required=_required(f), **kw)


def _alias(container, aliases: tuple[str, ...], main: str) -> None:
    """Make each alias another option string of the action behind `main` (same dest, type, default)."""
    action = container._option_string_actions[main]
    for alias in aliases:
        action.option_strings.append(alias)
        container._option_string_actions[alias] = action


def add_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "", title: str | None = None,
                only: tuple[str, ...] | None = None) -> None:
    """Add a flag per field of `cls` (dest `prefix.field`); nested dataclasses become help groups."""
    hints, docs = _hints(cls), field_docs(cls)
    about = None if only else (cls.__doc__ or "").split("\n")[0]  # a few fields: the class's summary misleads
    group = parser.add_argument_group(title, about) if title else parser
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        o, tp = option(f), hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_options(parser, tp, f"{prefix}{f.name}.", o.group or f.name, o.only)
            continue
        _argument(parser if _required(f) or o.positional else group, f, tp, prefix + f.name, docs.get(f.name, ""))


def snake_spellings(parser: argparse.ArgumentParser) -> None:
    """Accept `--thread_count` wherever `--thread-count` works (img2dataset's spelling of flags)."""
    for action in list(parser._actions):
        snake = dict.fromkeys("--" + s[2:].replace("-", "_") for s in action.option_strings if s.startswith("--"))
        new = tuple(s for s in snake if s not in parser._option_string_actions)
        if new:
            _alias(parser, new, action.option_strings[0])


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


def flags(cls: type, prefix: str = "") -> dict[str, tuple[str, bool]]:
    """Dotted field name -> (its main flag, whether the flag negates it), nested dataclasses included."""
    hints, out = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(flags(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (names_of(f)[0], option(f).negate)
    return out


def spellings(cls: type, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Dotted field name -> every flag spelling of it, nested dataclasses included."""
    hints, out = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(spellings(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = names_of(f)
    return out


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
