"""Stage options from YAML and the command line into a stage's dataclasses, with one-line errors.

    python -m quill.stages.sft --config recipes/tiny/sft.yaml learning_rate=3e-4 model_config.depth=8

- `key=value`, `--key value` and `--key=value` all work; a bare `--flag` sets a bool to true and `--no_flag` sets
  it to false (HfArgumentParser's conventions). `--help` lists every option with its type, default and help.
- Values are YAML: `1e-3`, `true`, `[a, b]`, `{depth: 4}`. `a.b=v` sets one entry of a mapping option.
- A key that several dataclasses share (`output_dir`, `push_to_hub`) is set on all of them.
- An `env:` mapping in the file sets environment variables, as TrlParser does.

Checks, in the order a user meets them: YAML syntax, unknown keys (with the nearest valid one), types, then
`quill.arguments.check_values` (ranges, options Quill does not act on, conflicts), then the dataclasses' own
`__post_init__`, whose ValueErrors become one-line errors too.

Why not TrlParser / HfArgumentParser: they are argparse underneath, so a bad value exits with usage text instead of
a message naming the file and line; they take no `key=value`; they reject a key two dataclasses share; and they
cannot express `dict | None` or `list[dict | str]` options. Their conventions and dataclasses are kept.
"""

import copy
import dataclasses
import enum
import functools
import json
import os
import re
import sys
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from quill.arguments import check_values
from quill.coercion import FALSE_WORDS, TRUE_WORDS, Mismatch, coerce, describe_type, is_bool, type_choices, type_members
from quill.errors import QuillError, did_you_mean, display_path, nearby_file_hint, one_line, unknown_key_error

RESERVED_KEYS = ("config", "env")  # `--config FILE` and the file's `env:` mapping are syntax, not options
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
# Fixes for the ValueErrors that TrainingArguments / TRL configs raise from __post_init__ (matched by substring).
POST_INIT_FIXES = [
    ("support bf16", "set bf16: false, or use_cpu: true to train on CPU"),
    ("fp16 mixed precision requires a GPU", "set fp16: false, or train on a GPU"),
    ("requires the save and eval strategy to match", "set save_strategy to the same value as eval_strategy"),
    ("requires an eval strategy", "set eval_strategy (and eval_size) or pick another lr_scheduler_type"),
    ("is not a valid", "check the spelling of the value in the message"),
]


@dataclass
class Option:
    name: str
    type: Any
    default: Any  # dataclasses.MISSING for a required option
    help: str


@dataclass
class ConfigFile:
    path: Path
    values: dict[str, tuple[Any, str]]  # key -> (value, "sft.yaml line 4")
    env: dict[str, str]


class Schema:
    """Every option the dataclasses of one stage accept, with its type and default."""

    def __init__(self, arg_types: Sequence[type]):
        self.arg_types = tuple(arg_types)
        self.options: dict[str, Option] = {}
        for dc in self.arg_types:
            if not (isinstance(dc, type) and dataclasses.is_dataclass(dc)):
                raise TypeError(f"ARG_TYPES must hold dataclass types, found {dc!r}")
            hints = typing.get_type_hints(dc)
            for f in dataclasses.fields(dc):
                if not f.init or f.name in self.options:  # a shared key: the first definition describes it
                    continue
                if f.name in RESERVED_KEYS:
                    raise TypeError(f"{dc.__name__}.{f.name}: '{f.name}' is reserved by the config parser")
                default = f.default
                if f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                tp = hints.get(f.name, Any)
                if f.metadata.get("choices"):  # text options with a fixed set of values are Literals to us
                    choices = Literal[tuple(f.metadata["choices"])]
                    tp = choices | None if type_members(tp)[1] else choices
                self.options[f.name] = Option(f.name, tp, default, f.metadata.get("help", ""))

    def require(self, key: str, where: str) -> Option:
        if key not in self.options:
            raise unknown_key_error(key, self.options, where)
        return self.options[key]


@functools.lru_cache(maxsize=32)
def schema_for(arg_types: tuple[type, ...]) -> Schema:
    return Schema(arg_types)


def option_names(arg_types: Sequence[type]) -> set[str]:
    """The keys a stage with these ARG_TYPES accepts (the recipe runner routes overrides by them)."""
    return set(schema_for(tuple(arg_types)).options)


def parse_stage_args(arg_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """`--config FILE` plus overrides -> one instance per dataclass in `arg_types`, in that order.

    Raises QuillError (one line) for anything wrong; prints the options and exits for `-h` / `--help`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_stage_help(arg_types)
        raise SystemExit(0)
    return build_stage_args(arg_types, argv, apply_env=True)


def build_stage_args(arg_types: Sequence[type], argv: Sequence[str], apply_env: bool = False) -> tuple:
    """parse_stage_args without --help; with apply_env=False it has no side effects (the recipe runner's check)."""
    schema = schema_for(tuple(arg_types))
    config_path, overrides = split_argv(argv, schema)
    values: dict[str, tuple[Any, str]] = {}
    source = ""  # prefix for errors raised while building the dataclasses: the config file, if any
    if config_path is not None:
        cfg = load_config_file(config_path)
        source = display_path(cfg.path) + ": "
        for key, (value, where) in cfg.values.items():
            schema.require(key, where)
            values[key] = (value, where)
        if apply_env:
            os.environ.update(cfg.env)
    for key, text, where in overrides:
        _apply_override(values, schema, key, text, where)

    for key, (value, where) in list(values.items()):
        values[key] = (coerce_option(schema.options[key], value, where), where)
    effective = {name: values[name][0] if name in values else opt.default for name, opt in schema.options.items()}
    check_values(effective, values)
    _check_model_config(values)
    return tuple(_instantiate(dc, values, source) for dc in schema.arg_types)


def split_argv(argv: Sequence[str], schema: Schema) -> tuple[str | None, list[tuple[str, str, str]]]:
    """Separates `--config FILE` from the overrides; returns (config path, [(key, value text, where)])."""
    config, out, argv, i = None, [], list(argv), 0
    while i < len(argv):
        tok, nxt = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if tok == "--config" or tok.startswith("--config="):
            if config is not None:
                raise QuillError("--config is given twice", "pass one config file; override single keys as key=value")
            if tok == "--config" and nxt is None:
                raise QuillError("--config needs a file path", "e.g. --config recipes/tiny/sft.yaml")
            config, i = (nxt, i + 2) if tok == "--config" else (tok.split("=", 1)[1], i + 1)
        elif tok.startswith("--") and "=" in tok:
            key, text = tok[2:].split("=", 1)
            out.append((key, text, f"argument '{tok}'"))
            i += 1
        elif tok.startswith("--"):
            key = tok[2:].replace("-", "_")
            opt = schema.options.get(key)
            if key == "debug" and (nxt is None or nxt.startswith("-") or "=" in nxt):
                # Bare --debug is Quill's "show tracebacks" flag (TrainingArguments' `debug` always takes a value).
                os.environ["QUILL_DEBUG"] = "1"
                i += 1
            elif opt is not None and is_bool(opt.type):
                takes_next = nxt is not None and nxt.lower() in TRUE_WORDS + FALSE_WORDS
                out.append(
                    (
                        key,
                        nxt if takes_next else "true",
                        f"argument '{tok} {nxt}'" if takes_next else f"argument '{tok}'",
                    )
                )
                i += 2 if takes_next else 1
            elif opt is None and key.startswith("no_") and is_bool(getattr(schema.options.get(key[3:]), "type", None)):
                out.append((key[3:], "false", f"argument '{tok}'"))
                i += 1
            else:
                schema.require(key, f"argument '{tok}'")
                if nxt is None:
                    raise QuillError(f"argument '{tok}' needs a value", f"e.g. {key}=VALUE")
                out.append((key, nxt, f"argument '{tok} {nxt}'"))
                i += 2
        elif "=" in tok and not tok.startswith("-"):
            key, text = tok.split("=", 1)
            out.append((key, text, f"override '{tok}'"))
            i += 1
        else:
            raise QuillError(
                f"unexpected argument '{tok}'",
                "pass the config file as --config FILE and options as key=value (e.g. learning_rate=1e-4)",
            )
    for key, _, where in out:
        if not _KEY_RE.match(key):
            raise QuillError(f"{where}: '{key}' is not an option name", "write key=value, e.g. learning_rate=1e-4")
    return config, out


def load_config_file(path: str | os.PathLike) -> ConfigFile:
    """Reads a stage config: a YAML mapping of option -> value, plus an optional `env:` mapping."""
    p = Path(path)
    if not p.is_file():
        raise QuillError(f"config file {path} not found", nearby_file_hint(p))
    text, shown = p.read_text(encoding="utf-8"), display_path(p)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        problem = e.problem or e.context or "syntax error"
        fix = "indent with spaces, not tabs" if "'\\t'" in problem else "check indentation and quoting on that line"
        raise QuillError(f"{at}: invalid YAML: {problem}", fix) from None
    except yaml.YAMLError as e:
        raise QuillError(f"{shown}: invalid YAML: {one_line(e)}", "check the file's syntax") from None
    if data is None:
        return ConfigFile(p, {}, {})
    if not isinstance(data, dict):
        raise QuillError(
            f"{shown}: expected a mapping of option: value, found {type(data).__name__}",
            "write one key: value per line",
        )
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):  # a non-text key is reported below
            line = key_node.start_mark.line + 1
            key = yaml.safe_load(key_node.value) if key_node.tag != "tag:yaml.org,2002:str" else key_node.value
            if key in lines:
                raise QuillError(f"{shown} line {line}: '{key}' is set twice (also on line {lines[key]})", "keep one")
            lines[key] = line
    values, env = {}, {}
    for key, value in data.items():
        where = f"{shown} line {lines.get(key, '?')}"
        if not isinstance(key, str):
            raise QuillError(f"{where}: option names must be text, found {_show(key)}", "quote the key")
        if key == "env":
            if not isinstance(value, dict):
                raise QuillError(f"{where}: env must be a mapping of VARIABLE: value", "e.g. env: {HF_HUB_OFFLINE: 1}")
            env = {str(k): "" if v is None else str(v) for k, v in value.items()}
        elif key == "config":
            raise QuillError(f"{where}: a config file cannot name another config file", "remove the 'config' key")
        else:
            values[key.replace("-", "_")] = (value, where)
    return ConfigFile(p, values, env)


def _apply_override(values: dict, schema: Schema, key: str, text: str, where: str) -> None:
    top, _, sub = key.replace("-", "_").partition(".")
    opt = schema.require(top, where)
    if not sub:
        values[top] = (_value_from_text(text, opt.type, where), where)
        return
    current = values[top][0] if top in values else opt.default
    if current is None or current is dataclasses.MISSING:
        current = {}
    if not isinstance(current, dict):
        raise QuillError(f"{where}: '{top}' is not a mapping, so '{key}' cannot set part of it", f"use {top}=VALUE")
    current = node = copy.deepcopy(current)
    *parents, leaf = sub.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = _value_from_text(text, Any, where)
    values[top] = (current, where)


def _value_from_text(text: str, tp: Any, where: str) -> Any:
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
        raise QuillError(f"{where}: the value is not valid YAML", "quote it, e.g. key='[a, b]'") from None


def coerce_option(opt: Option, value: Any, where: str) -> Any:
    try:
        return coerce(value, opt.type)
    except Mismatch:
        names = [str(c) for c in type_choices(opt.type)]
        fix = did_you_mean(value, names) if names and isinstance(value, str) else None
        if fix is None and isinstance(value, str) and any(m in (int, float) for m in type_members(opt.type)[0]):
            fix = f"write a number, e.g. {opt.name}: {opt.default if isinstance(opt.default, (int, float)) else 1}"
        raise QuillError(
            f"{where}: {opt.name}: expected {describe_type(opt.type)}, found {_show(value)}", fix
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Construction and help
# ---------------------------------------------------------------------------------------------------------------


def _check_model_config(values: dict[str, tuple[Any, str]]) -> None:
    """model_config keys are QuillConfig fields; QuillConfig itself accepts any key, so a typo would pass silently."""
    value, where = values.get("model_config", (None, ""))
    if value:
        from quill.model.configuration_quill import QuillConfig

        known = {f.name for f in dataclasses.fields(QuillConfig)}
        for key in value:
            if key not in known:
                raise unknown_key_error(str(key), sorted(known), f"{where}: model_config")


def _instantiate(dc: type, values: dict[str, tuple[Any, str]], source: str) -> Any:
    fields = [f for f in dataclasses.fields(dc) if f.init]
    kwargs = {f.name: values[f.name][0] for f in fields if f.name in values}
    for f in fields:
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise QuillError(f"{source}required option '{f.name}' is not set", f"add {f.name}: VALUE to the config")
    try:
        return dc(**kwargs)
    except QuillError as e:
        raise QuillError(f"{source}{e.problem}", e.fix) from None
    except (ValueError, TypeError) as e:
        message = one_line(e, limit=None)
        fix = next((f for needle, f in POST_INIT_FIXES if needle in message), "change the options named in the message")
        raise QuillError(f"{source}invalid {dc.__name__} settings: {message}", fix) from None


def print_stage_help(arg_types: Sequence[type], prog: str | None = None) -> None:
    """Lists every option, its type, default and help, grouped by dataclass."""
    if prog is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        prog = f"python -m {spec.name}" if spec and spec.name != "__main__" else Path(sys.argv[0]).name
    print(f"usage: {prog} --config FILE [key=value ...] [--key value ...]\n")
    print("Options come from the YAML file given with --config; key=value (or --key value) overrides it.")
    schema = schema_for(tuple(arg_types))
    seen: set[str] = set()
    for dc in arg_types:
        print(f"\n{dc.__name__}:")
        for f in dataclasses.fields(dc):
            if f.init and f.name not in seen:
                seen.add(f.name)
                opt = schema.options[f.name]
                default = None if opt.default is dataclasses.MISSING else opt.default
                print(f"  {f.name} ({describe_type(opt.type)}, default {_show(default)})")
                if opt.help:
                    print(
                        textwrap.fill(
                            " ".join(str(opt.help).split()),
                            width=110,
                            initial_indent="      ",
                            subsequent_indent="      ",
                        )
                    )


def _show(v: Any) -> str:
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, str):
        return repr(v)
    return json.dumps(v, default=str) if isinstance(v, (bool, type(None), list, dict)) else str(v)
