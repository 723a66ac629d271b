"""Stage options from YAML and the command line into a stage's dataclasses, with one-line errors.

    python -m quill.stages.sft --config recipes/tiny/sft.yaml learning_rate=3e-4 model_config.depth=8

`QuillParser` is a `trl.TrlParser`: HfArgumentParser makes one option per dataclass field (`--key value`,
`--key=value`, a bare `--flag`, `--no_flag`, `--help` with every option's help and default), TrlParser makes the
values of the `--config` file the defaults. What Quill adds is marked `kept:` where it is, with what the library
lacks; in short:
- `key=value` (rewritten to `--key=value`), and `a.b=v`, which sets one entry of a mapping option;
- values in YAML syntax (`1e-3`, `[a, b]`, `{depth: 4}`) and union-typed options (quill.coercion);
- one-line errors (`QuillError`) naming the file and line, or the argument, that a bad value came from;
- a key several dataclasses share (`output_dir`, `push_to_hub`) is one option, set on all of them.

Checks, in the order a user meets them: YAML syntax, unknown keys (with the nearest valid one), types, then
`quill.arguments.check_values` (ranges, options Quill does not act on, conflicts), then the dataclasses' own
`__post_init__`, whose ValueErrors become one-line errors too. An `env:` mapping in the file sets environment
variables, as TrlParser does.
"""

import argparse
import copy
import dataclasses
import functools
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from trl import TrlParser

from quill.arguments import check_values
from quill.coercion import is_bool, option_type, show
from quill.errors import DEBUG_ENV, QuillError, display_path, nearby_file_hint, one_line, unknown_key_error

USAGE = "%(prog)s --config FILE [key=value ...] [--key value ...]"
# Fixes for the ValueErrors that TrainingArguments / TRL configs raise from __post_init__ (matched by substring).
POST_INIT_FIXES = [
    ("support bf16", "set bf16: false, or use_cpu: true to train on CPU"),
    ("fp16 mixed precision requires a GPU", "set fp16: false, or train on a GPU"),
    ("requires the save and eval strategy to match", "set save_strategy to the same value as eval_strategy"),
    ("requires an eval strategy", "set eval_strategy (and eval_size) or pick another lr_scheduler_type"),
    ("is not a valid", "check the spelling of the value in the message"),
]


@dataclass
class ConfigFile:
    path: Path
    values: dict[str, tuple[Any, str]]  # key -> (value, "sft.yaml line 4")
    env: dict[str, str]


@dataclass
class Given:
    """One option the user set: its key, its text (None: a bare flag, or a config value), and where it was set."""

    key: str
    text: str | None
    where: str


class QuillParser(TrlParser):
    def __init__(self, arg_types: Sequence[type], prog: str | None = None):
        # conflict_handler="resolve": a key two dataclasses share is one option (HfArgumentParser would refuse it);
        # allow_abbrev=False: `--learning` is an unknown key, not learning_rate.
        super().__init__(
            tuple(arg_types),
            prog=prog,
            usage=USAGE,
            description="Options come from the YAML file given with --config; key=value (or --key value) overrides it.",
            conflict_handler="resolve",
            allow_abbrev=False,
        )
        self.given: list[Given] = []

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        # kept: HfArgumentParser takes one type per option; every option gets quill.coercion's converter instead,
        # which reads YAML and unions. The option strings, default, help and bare `--flag` stay HfArgumentParser's.
        tp, field = field.type, copy.copy(field)
        field.type = bool if is_bool(tp) else str
        HfArgumentParser._parse_dataclass_field(parser, field)
        action = parser._option_string_actions[f"--{field.name}"]
        action.type = option_type(field.name, tp, action.default, field.metadata.get("choices"))
        action.choices = None  # the converter checks them, and suggests the nearest
        if is_bool(tp) and f"--no_{field.name}" not in parser._option_string_actions:
            # kept: HfArgumentParser adds `--no_flag` only to flags that default to true.
            parser.add_argument(
                f"--no_{field.name}", action="store_false", dest=field.name, default=action.default, help="set to false"
            )

    def error(self, message: str):
        # kept: argparse prints its usage and exits 2; Quill prints one line naming the argument and a fix.
        if message.startswith("unrecognized arguments: "):
            token = message.split(": ", 1)[1].split()[0]
            where = next((g.where for g in self.given if f"--{g.key}" == token.split("=")[0]), f"argument '{token}'")
            if not token.startswith("--"):
                raise QuillError(
                    f"unexpected argument '{token}'",
                    "pass the config file as --config FILE and options as key=value (e.g. learning_rate=1e-4)",
                )
            raise unknown_key_error(token[2:].split("=")[0], self.option_names(), where)
        match = re.match(r"argument (--\w+)[^:]*: (.*)", message)
        if not match:
            raise QuillError(message, "run with --help to list the options")
        action, problem = self._option_string_actions[match[1]], match[2]
        given = [g for g in self.given if g.key == action.dest]
        where = next((g.where for g in given if _fails(action, g.text)), given[-1].where if given else match[1])
        if problem == "expected one argument":
            raise QuillError(f"{where} needs a value", f"e.g. {action.dest}=VALUE")
        raise _error_at(where, problem)

    def option_names(self) -> list[str]:
        return [f.name for dc in self.dataclass_types for f in dataclasses.fields(dc) if f.init]

    def parse_args_and_config(self, args: Sequence[str] | None = None, apply_env: bool = True) -> tuple:
        """`--config FILE` plus overrides -> one instance per dataclass; QuillError (one line) for anything wrong."""
        args = list(sys.argv[1:] if args is None else args)
        config_path, tokens, entries = self._rewrite(args)
        values: dict[str, tuple[Any, str]] = {}  # what the user set: key -> (value, where)
        source = ""  # prefix for errors raised while building the dataclasses: the config file, if any
        if config_path is not None:
            cfg = load_config_file(config_path)
            source = display_path(cfg.path) + ": "
            # kept: TrlParser reads the file without line numbers and sets its values as defaults, which argparse
            # checks only if they are text; each value is converted here, so an error names its line.
            names = self.option_names()
            for key, (value, where) in cfg.values.items():
                if key not in names:
                    raise unknown_key_error(key, names, where)
                action = self._option_string_actions[f"--{key}"]
                try:
                    values[key] = (action.type(value), where)
                except argparse.ArgumentTypeError as e:
                    raise _error_at(where, str(e)) from None
            self.set_defaults_with_config(**{k: v for k, (v, _) in values.items()})
            if apply_env:
                os.environ.update(cfg.env)
        namespace = self.parse_args(tokens)
        for g in self.given:
            values[g.key] = (getattr(namespace, g.key), g.where)
        for key, path, text, where in entries:
            _set_entry(namespace, key, path, text, where, self.option_names())
            values[key] = (getattr(namespace, key), where)
        check_values(vars(namespace), values)
        return tuple(_build(dc, namespace, source) for dc in self.dataclass_types)

    def _rewrite(self, args: list[str]) -> tuple[str | None, list[str], list[tuple[str, str, str, str]]]:
        """(the --config file, the argparse tokens, the `a.b=v` entries); records each option in `self.given`."""
        config, tokens, entries, i = None, [], [], 0
        while i < len(args):
            tok, nxt = args[i], args[i + 1] if i + 1 < len(args) else None
            i += 1
            if tok == "--config" or tok.startswith("--config="):
                # kept: TrlParser takes one `--config FILE` and says nothing of a second or of a missing path.
                if config is not None:
                    raise QuillError(
                        "--config is given twice", "pass one config file; override single keys as key=value"
                    )
                if tok == "--config" and nxt is None:
                    raise QuillError("--config needs a file path", "e.g. --config recipes/tiny/sft.yaml")
                config, i = (nxt, i + 1) if tok == "--config" else (tok.split("=", 1)[1], i)
                continue
            if tok == "--debug" and not _is_value(nxt):
                os.environ[DEBUG_ENV] = (
                    "1"  # kept: bare --debug shows tracebacks (TrainingArguments' debug takes a value)
                )
                continue
            if tok.startswith("--"):
                key, eq, text = tok[2:].partition("=")
                key = key.replace("-", "_")  # `--no-use_cpu`, `--per-device-train-batch-size`: any mix of - and _
                action, where = self._option_string_actions.get(f"--{key}"), f"argument '{tok}'"
                if action is not None and not eq and nxt is not None and (action.nargs is None or _is_value(nxt)):
                    # kept: value joined to its key, as argparse before Python 3.13 reads -1e-4 as an option
                    eq, text, where, i = "=", nxt, f"argument '{tok} {nxt}'", i + 1
                tokens.append(f"--{key}{eq}{text}")
                key = action.dest if action is not None else key  # --no_flag sets flag
            elif "=" in tok and not tok.startswith("-"):
                # kept: argparse has no `key=value`; `a.b=v` sets one entry of the mapping option `a`.
                key, eq, text = tok.partition("=")
                key, dot, path = key.replace("-", "_").partition(".")
                where = f"override '{tok}'"
                if dot:
                    entries.append((key, path, text, where))
                    continue
                tokens.append(f"--{key}={text}")
            else:
                tokens.append(tok)  # argparse reports it
                continue
            self.given.append(Given(key, text if eq else None, where))
            entries = [e for e in entries if e[0] != key]  # a whole `a=...` replaces the entries set before it
        return config, tokens, entries


def _error_at(where: str, text: str) -> QuillError:
    problem, _, fix = text.partition("; fix: ")  # quill.coercion's ArgumentTypeErrors read `problem; fix: fix`
    return QuillError(f"{where}: {problem}", fix or None)


def _is_value(token: str | None) -> bool:
    return token is not None and not token.startswith("-") and "=" not in token


def _fails(action: argparse.Action, text: str | None) -> bool:
    if text is None:
        return action.nargs is None
    try:
        action.type(text)
    except argparse.ArgumentTypeError:
        return True
    return False


def _set_entry(namespace, key: str, path: str, text: str, where: str, names: list[str]) -> None:
    if key not in names:
        raise unknown_key_error(key, names, where)
    current = getattr(namespace, key)
    if current is None:
        current = {}
    if not isinstance(current, dict):
        raise QuillError(
            f"{where}: '{key}' is not a mapping, so '{key}.{path}' cannot set part of it", f"use {key}=VALUE"
        )
    current = node = copy.deepcopy(current)
    *parents, leaf = path.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    try:
        node[leaf] = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        node[leaf] = text
    setattr(namespace, key, current)


def _build(dc: type, namespace: argparse.Namespace, source: str) -> Any:
    # kept: HfArgumentParser hands a shared key to the first dataclass only, and its __post_init__ errors are
    # tracebacks; each dataclass gets every value it has a field for, and an error is one line naming it.
    kwargs = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(dc) if f.init}
    try:
        return dc(**kwargs)
    except QuillError as e:
        raise QuillError(f"{source}{e.problem}", e.fix) from None
    except (ValueError, TypeError) as e:
        message = one_line(e, limit=None)
        fix = next((f for needle, f in POST_INIT_FIXES if needle in message), "change the options named in the message")
        raise QuillError(f"{source}invalid {dc.__name__} settings: {message}", fix) from None


# ---------------------------------------------------------------------------------------------------------------
# The entry points stages and the recipe runner use
# ---------------------------------------------------------------------------------------------------------------


def parse_stage_args(arg_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """`--config FILE` plus overrides -> one instance per dataclass in `arg_types`, in that order.

    Raises QuillError (one line) for anything wrong; prints the options and exits for `-h` / `--help`.
    """
    return QuillParser(arg_types, prog=_prog()).parse_args_and_config(argv)


def build_stage_args(arg_types: Sequence[type], argv: Sequence[str], apply_env: bool = False) -> tuple:
    """parse_stage_args; with apply_env=False it has no side effects (the recipe runner's check)."""
    return QuillParser(arg_types).parse_args_and_config(argv, apply_env=apply_env)


@functools.lru_cache(maxsize=32)
def _option_names(arg_types: tuple[type, ...]) -> frozenset[str]:
    return frozenset(QuillParser(arg_types).option_names())


def option_names(arg_types: Sequence[type]) -> set[str]:
    """The keys a stage with these ARG_TYPES accepts (the recipe runner routes overrides by them)."""
    return set(_option_names(tuple(arg_types)))


def print_stage_help(arg_types: Sequence[type], prog: str | None = None) -> None:
    """Lists every option, its help and default."""
    QuillParser(arg_types, prog=prog or _prog()).print_help()


def _prog() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec and spec.name != "__main__" else Path(sys.argv[0]).name


def load_config_file(path: str | os.PathLike) -> ConfigFile:
    """Reads a stage config: a YAML mapping of option -> value, plus an optional `env:` mapping.

    kept: TrlParser reads the file with yaml.safe_load, whose errors and values carry no line number; the recipe
    runner reads recipe.yaml with it too.
    """
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
            raise QuillError(f"{where}: option names must be text, found {show(key)}", "quote the key")
        if key == "env":
            if not isinstance(value, dict):
                raise QuillError(f"{where}: env must be a mapping of VARIABLE: value", "e.g. env: {HF_HUB_OFFLINE: 1}")
            env = {str(k): "" if v is None else str(v) for k, v in value.items()}
        elif key == "config":
            raise QuillError(f"{where}: a config file cannot name another config file", "remove the 'config' key")
        else:
            values[key.replace("-", "_")] = (value, where)
    return ConfigFile(p, values, env)
