"""The argparse `type` of every stage option: YAML text (or a YAML value from a config file) into the type the
dataclass field is annotated with, or an error that says what was expected.

Why not HfArgumentParser's own types: it takes one type per option, so it cannot express the unions TRL's,
transformers' and Quill's configs use (`list[dict | str]`, `str | list[str] | None`, `dict | None`), it reads a list
as several arguments instead of YAML's `[a, b]`, and its messages name neither what was expected nor the nearest
choice. `type_members` is the one place an annotation is taken apart: coercion, descriptions and choice lists all go
through it.
"""

import argparse
import enum
import json
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

import yaml

from quill.errors import QuillError, did_you_mean

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option_type(name: str, tp: Any, default: Any, choices: Sequence | None = None) -> Callable[[Any], Any]:
    """The converter argparse calls on an option's text; config values (already YAML) go through it too.

    A failure is an ArgumentTypeError whose text is `problem; fix: fix`, which QuillParser.error turns back into a
    QuillError. `choices` (TRL's metadata, e.g. ModelConfig.dtype) make a text option a Literal.
    """
    if choices:
        tp = Literal[tuple(choices)] | None if type_members(tp)[1] else Literal[tuple(choices)]

    def convert(value: Any) -> Any:
        if isinstance(value, str) and value == default:  # argparse converts text defaults too; they stand as they are
            return value
        value = from_text(value, tp) if isinstance(value, str) else value
        try:
            return coerce(value, tp)
        except Mismatch:
            raise argparse.ArgumentTypeError(str(type_error(name, tp, default, value))) from None

    return convert


def from_text(text: str, tp: Any) -> Any:
    """A command-line value: YAML, except for plain text options, which take the text as is (`name=007`)."""
    members, nullable = type_members(tp)
    if members == [str]:
        return None if text in ("null", "~") or (text == "" and nullable) else text
    if text == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        if str in members or tp is Any:
            return text
        raise argparse.ArgumentTypeError(
            str(QuillError("the value is not valid YAML", "quote it, e.g. key='[a, b]'"))
        ) from None


def type_error(name: str, tp: Any, default: Any, value: Any) -> QuillError:
    names = [str(c) for c in type_choices(tp)]
    fix = did_you_mean(value, names) if names and isinstance(value, str) else None
    if fix is None and isinstance(value, str) and any(m in (int, float) for m in type_members(tp)[0]):
        fix = f"write a number, e.g. {name}: {default if isinstance(default, (int, float)) else 1}"
    return QuillError(f"{name}: expected {describe_type(tp)}, found {show(value)}", fix)


def show(v: Any) -> str:
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, str):
        return repr(v)
    return json.dumps(v, default=str) if isinstance(v, (bool, type(None), list, dict)) else str(v)


# ---------------------------------------------------------------------------------------------------------------


class Mismatch(Exception):
    pass


def type_members(tp: Any) -> tuple[list, bool]:
    """(the types a value may have, whether null is allowed); `str` beside an Enum is dropped: transformers would
    validate such text against the enum later, we check it now."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        members = [a for a in args if a is not type(None)]
        if str in members and any(_is_enum(m) for m in members):
            members.remove(str)
        return members, type(None) in args
    return ([], True) if tp is type(None) else ([tp], False)


def type_choices(tp: Any) -> list:
    """The allowed values of a Literal or Enum type (or of the Literal/Enum members of a union)."""
    out = []
    for m in type_members(tp)[0]:
        if typing.get_origin(m) is Literal:
            out += list(typing.get_args(m))
        elif _is_enum(m):
            out += [x.value for x in m]
    return out


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def is_bool(tp: Any) -> bool:
    return type_members(tp)[0] == [bool]


def _is_exact(v: Any, tp: Any) -> bool:
    """Whether `v` already has type `tp` (no conversion needed); decides which union member a value belongs to."""
    if tp in (int, float):
        return isinstance(v, tp) and not isinstance(v, bool)
    if typing.get_origin(tp) is Literal or _is_enum(tp):
        return any(v == c and type(v) is type(c) for c in type_choices(tp))
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and isinstance(v, origin)


def coerce(v: Any, tp: Any) -> Any:
    """`v` as type `tp`, or Mismatch. Union members are tried exact matches first, then conversions, text last."""
    if tp is Any or isinstance(tp, typing.TypeVar):
        return v
    members, nullable = type_members(tp)
    if v is None:
        if nullable:
            return None
        raise Mismatch
    exact = [m for m in members if _is_exact(v, m)]
    for m in exact + sorted((m for m in members if m not in exact), key=lambda m: m is str):
        try:
            return _coerce_one(v, m)
        except Mismatch:
            pass
    raise Mismatch


def _coerce_one(v: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal or _is_enum(tp):
        choices = type_choices(tp)
        if isinstance(v, enum.Enum):
            v = v.value
        if v in choices and not isinstance(v, bool):
            return v
        text = _bool_word(v, choices) if isinstance(v, bool) else str(v)
        match = [c for c in choices if isinstance(c, str) and text is not None and c.lower() == text.lower()]
        if match:
            return match[0]
    elif tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in TRUE_WORDS + FALSE_WORDS:
            return v.lower() in TRUE_WORDS
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
    elif tp is int and not isinstance(v, bool):
        if isinstance(v, int):
            return v
        try:
            f = float(v) if isinstance(v, (str, float)) else None
        except ValueError:
            f = None
        if f is not None and f.is_integer():
            return int(f)
    elif tp is float and isinstance(v, (int, float, str)) and not isinstance(v, bool):
        try:  # PyYAML reads `1e-3` (no dot) as text
            return float(v)
        except ValueError:
            pass
    elif tp is str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    elif origin in (list, tuple, Sequence) or tp in (list, tuple):
        item = args[0] if args else Any
        if isinstance(v, (list, tuple)):
            return [coerce(x, item) for x in v]
        if not isinstance(v, dict):
            return [coerce(v, item)]
    elif origin is dict or tp is dict:
        if isinstance(v, str):
            with_json = _try_json(v)
            v = with_json if isinstance(with_json, dict) else v
        if isinstance(v, dict):
            return v
    elif isinstance(tp, type) and isinstance(v, (tp, dict)):  # e.g. ParallelismConfig: its call
        return v
    raise Mismatch


def _try_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _bool_word(v: bool, choices: list) -> str | None:
    # YAML 1.1 reads `eval_strategy: no` as false; map it back when the option has such a choice.
    for word in ("no", "false", "off") if v is False else ("yes", "true", "on"):
        if word in [str(c).lower() for c in choices]:
            return word
    return None


def describe_type(tp: Any) -> str:
    """`float`, `int or null`, `one of 'linear', 'cosine'`, `list of str`, ..."""
    if tp is Any:
        return "any value"
    members, nullable = type_members(tp)
    if len(members) != 1 or nullable:
        return " or ".join([describe_type(m) for m in members] + (["null"] if nullable else []))
    tp = members[0]  # `SchedulerType | str` is the enum (type_members drops the str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal or _is_enum(tp):
        return "one of " + ", ".join(repr(c) for c in type_choices(tp))
    if tp is bool:
        return "true or false"
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))
