"""Stage arguments: the config dataclasses every stage shares, and the parser that fills them.

A stage reads its settings the way TRL's scripts do (a YAML file, then command-line overrides), but every mistake
is reported as one line that names the file and line it came from:

    python -m quill.stages.sft --config recipes/tiny/sft.yaml learning_rate=3e-4 model_config.depth=8

- `key=value`, `--key value` and `--key=value` all work; a bare `--flag` sets a bool to true and `--no_flag` sets
  it to false (HfArgumentParser's conventions). `--help` lists every option with its type, default and help.
- Values are YAML: `1e-3`, `true`, `[a, b]`, `{depth: 4}`. `a.b=v` sets one entry of a mapping option.
- A key that several dataclasses share (`output_dir`, `trust_remote_code`, `push_to_hub`) is set on all of them.
- An `env:` mapping in the file sets environment variables, as TrlParser does.

Checks, in the order a user meets them: YAML syntax, unknown keys (with the nearest valid one), types, ranges
(RANGE_RULES), conflicts between options (CONFLICT_RULES), then the dataclasses' own `__post_init__`:
TrainingArguments raises ValueError for bad combinations, and those become one-line QuillErrors too.

Why not TrlParser / HfArgumentParser directly: they are argparse underneath, so a bad value exits with usage text
instead of a message naming the file and line; they take no `key=value`; they reject a key two dataclasses share;
and they cannot express `dict | None` or `list[dict | str]` options. We keep their conventions and their dataclasses
(trl.ModelConfig, TrainingArguments and TRL's configs are used as they are) and replace only the parsing.
"""

import copy
import dataclasses
import difflib
import enum
import functools
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from trl import ModelConfig

from quill.errors import QuillError

# ---------------------------------------------------------------------------------------------------------------
# Shared dataclasses
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments(ModelConfig):
    """Where the model comes from (a checkpoint, or a fresh Quill config), its tokenizer, and the LoRA adapter.

    A subclass of `trl.ModelConfig`, so `trl.get_peft_config(model_args)` and `get_quantization_config` take it
    as is; the fields below are the ones Quill adds or changes.
    """

    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer to load; defaults to model_name_or_path. A recipe points it at its tokenizer stage."
        },
    )
    model_config: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "QuillConfig fields for a model trained from scratch, e.g. {depth: 4}. "
            "Only valid without model_name_or_path."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run modelling code shipped with a checkpoint (needed for non-Quill custom models)."},
    )
    # trl.ModelConfig defaults to None (PEFT's per-architecture table, which knows nothing of Quill).
    lora_target_modules: str | list[str] | None = field(
        default="all-linear",
        metadata={"help": "Modules to adapt with LoRA: 'all-linear', or a list of module names."},
    )
    merge_lora_on_save: bool = field(
        default=False,
        metadata={"help": "Merge the LoRA adapter into the base weights when saving, so the output is a plain model."},
    )


# Fields of one dataset_mixture entry; quill.data.sources.DataSource, when present, is the authority.
MIXTURE_KEYS = ("path", "name", "split", "revision", "weight", "columns", "max_samples")


@dataclass
class DataArguments:
    """Which datasets to train on, mixed in what proportion, how to hold out an eval split, and the task eval."""

    dataset_mixture: list[dict[str, Any] | str] = field(
        default_factory=list,
        metadata={
            "help": "Datasets to mix: a list of {path, name, split, revision, weight, columns, max_samples}; a "
            "plain string is {path: STRING}. weight scales a source's rows (0.5 keeps half, 2 repeats them)."
        },
    )
    eval_size: float = field(
        default=0.0,
        metadata={"help": "Held-out eval split: a fraction of the mix if < 1, a number of rows if >= 1, none if 0."},
    )
    dataset_seed: int = field(default=42, metadata={"help": "Seed for mixing, shuffling and the eval split."})
    task_eval: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Held-out task rows {prompt, task, answer} a chat model is scored on (a data source)."},
    )
    task_eval_limit: int | None = field(default=None, metadata={"help": "Score at most this many task_eval rows."})

    def __post_init__(self):
        self.dataset_mixture = normalize_dataset_mixture(self.dataset_mixture)
        if self.task_eval is not None:
            self.task_eval = normalize_dataset_mixture([self.task_eval], "task_eval")[0]

    def sources(self) -> list:
        """The mixture as quill.data.sources.DataSource objects."""
        from quill.data.sources import DataSource

        return [DataSource.parse(entry) for entry in self.dataset_mixture]

    def names(self) -> list[str]:
        """Dataset ids for the model card, in mixture order, without repeats."""
        return list(dict.fromkeys(str(entry["path"]) for entry in self.dataset_mixture))


@dataclass
class RunArguments:
    """Options every stage takes, whatever it trains. Keys shared with TrainingArguments are set on both."""

    output_dir: str | None = field(default=None, metadata={"help": "Where the stage writes its output."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Start over: replace a finished or partial output in output_dir instead of resuming."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the output to the Hugging Face Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository to upload to (user/name)."})


@dataclass
class RewardModelArguments:
    """The reward model an RL stage scores completions with; a recipe fills it from `reward_model: <stage>`."""

    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model checkpoint (a sequence-classification model)."}
    )


def normalize_dataset_mixture(entries: Any, what: str = "dataset_mixture") -> list[dict[str, Any]]:
    """Checks data-source entries and returns them as dicts (a bare string is shorthand for {path: ...})."""
    if entries is None:
        return []
    if isinstance(entries, (str, dict)):
        entries = [entries]
    allowed, parse = _data_source()
    out = []
    for i, entry in enumerate(entries):
        where = f"{what}[{i}]" if what == "dataset_mixture" else what
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise QuillError(
                f"{where}: expected a mapping like {{path: ..., weight: ...}}, found {_show(entry)}",
                "write each dataset as a mapping or as its path",
            )
        for key in entry:
            if key not in allowed:
                raise unknown_key_error(str(key), allowed, where)
        if not entry.get("path"):
            raise QuillError(f"{where}: 'path' is missing", "give the Hub dataset id or a local path as path: ...")
        if parse is not None:  # the data layer's own checks (weight > 0, columns is a mapping, ...)
            try:
                parse(entry)
            except QuillError as e:
                raise QuillError(f"{where}: {e.problem}", e.fix) from None
        out.append(dict(entry))
    return out


def _data_source() -> tuple[tuple[str, ...], Callable | None]:
    """(allowed keys, DataSource.parse) from the data layer, or our own key list before it exists."""
    try:
        from quill.data.sources import DataSource
    except ImportError:
        return MIXTURE_KEYS, None
    return tuple(f.name for f in dataclasses.fields(DataSource)), getattr(DataSource, "parse", None)


# ---------------------------------------------------------------------------------------------------------------
# Validation tables: checked on the merged values before any dataclass is built, so a message can name the file
# and line the value came from. None always passes (it means "unset").
# ---------------------------------------------------------------------------------------------------------------

Rule = tuple[Callable[[Any], bool], str]


def _between(lo: float, hi: float, hi_open: bool = False) -> Rule:
    if hi_open:
        return (lambda v: lo <= v < hi), f"in [{lo}, {hi})"
    return (lambda v: lo <= v <= hi), f"in [{lo}, {hi}]"


def _min(lo: float, strict: bool = False) -> Rule:
    if strict:
        return (lambda v: v > lo), f"> {lo}"
    return (lambda v: v >= lo), f">= {lo}"


RANGE_RULES: dict[str, Rule] = {
    "learning_rate": _min(0, strict=True),
    "num_train_epochs": _min(0),
    "max_steps": ((lambda v: v >= -1), ">= 1, or -1 to train for num_train_epochs"),
    "per_device_train_batch_size": _min(1),
    "per_device_eval_batch_size": _min(1),
    "gradient_accumulation_steps": _min(1),
    "warmup_steps": _min(0),  # transformers 5: a ratio of the run when < 1
    "weight_decay": _min(0),
    "max_grad_norm": _min(0),
    "adam_beta1": _between(0, 1, hi_open=True),
    "adam_beta2": _between(0, 1, hi_open=True),
    "adam_epsilon": _min(0, strict=True),
    "logging_steps": _min(0, strict=True),
    "save_steps": _min(0, strict=True),
    "eval_steps": _min(0, strict=True),
    "save_total_limit": _min(1),
    "seed": _min(0),
    "data_seed": _min(0),
    "dataset_seed": _min(0),
    "dataloader_num_workers": _min(0),
    "max_length": _min(1),
    "max_prompt_length": _min(1),
    "max_completion_length": _min(1),
    "eval_size": _min(0),
    "lora_r": _min(1),
    "lora_alpha": _min(0, strict=True),
    "lora_dropout": _between(0, 1, hi_open=True),
    "beta": _min(0),  # DPO needs > 0, but GRPO's beta=0 means "no KL term"
    "temperature": _min(0, strict=True),
    "num_generations": ((lambda v: v >= 2), ">= 2 (group-relative advantages compare several samples per prompt)"),
}


def _enum_value(v: Any) -> Any:
    return v.value if isinstance(v, enum.Enum) else v


def _conflict_fp16_bf16(o):
    if o.get("fp16") is True and o.get("bf16") is True:
        return ("fp16", "bf16"), "fp16 and bf16 are both true", "keep one of them (bf16 on recent GPUs, fp16 on older)"


def _conflict_merge_without_peft(o):
    if o.get("merge_lora_on_save") is True and o.get("use_peft") is False:
        return (
            ("merge_lora_on_save", "use_peft"),
            "merge_lora_on_save is true but use_peft is false, so there is no adapter to merge",
            "set use_peft: true, or drop merge_lora_on_save",
        )


def _conflict_4bit_8bit(o):
    if o.get("load_in_4bit") is True and o.get("load_in_8bit") is True:
        return ("load_in_4bit", "load_in_8bit"), "load_in_4bit and load_in_8bit are both true", "keep one of them"


def _conflict_nothing_to_train(o):
    steps, epochs = o.get("max_steps"), o.get("num_train_epochs")
    if isinstance(steps, int) and isinstance(epochs, (int, float)) and steps <= 0 and epochs <= 0:
        return (
            ("max_steps", "num_train_epochs"),
            f"nothing to train: max_steps is {steps} and num_train_epochs is {epochs}",
            "set max_steps to a positive number of steps, or num_train_epochs > 0",
        )


def _conflict_scratch_and_checkpoint(o):
    if o.get("model_config") and o.get("model_name_or_path"):
        return (
            ("model_config", "model_name_or_path"),
            "model_config (a fresh model) and model_name_or_path (a checkpoint) are both set",
            "drop model_config to continue from the checkpoint, or model_name_or_path to train from scratch",
        )


def _conflict_eval_without_split(o):
    strategy = _enum_value(o.get("eval_strategy"))
    if "eval_size" in o and strategy not in (None, "no") and not o.get("eval_size"):
        return (
            ("eval_strategy", "eval_size"),
            f"eval_strategy is '{strategy}' but eval_size is 0, so there is no eval split",
            "set eval_size (e.g. 0.05), or eval_strategy: 'no'",
        )


# Each rule looks at the effective options (defaults included) and returns (keys, problem, fix) or None.
CONFLICT_RULES: list[Callable[[dict[str, Any]], tuple[tuple[str, ...], str, str] | None]] = [
    _conflict_fp16_bf16,
    _conflict_merge_without_peft,
    _conflict_4bit_8bit,
    _conflict_nothing_to_train,
    _conflict_scratch_and_checkpoint,
    _conflict_eval_without_split,
]

# Fixes for the ValueErrors that TrainingArguments / TRL configs raise from __post_init__ (matched by substring).
POST_INIT_FIXES = [
    ("support bf16", "set bf16: false, or use_cpu: true to train on CPU"),
    ("fp16 mixed precision requires a GPU", "set fp16: false, or train on a GPU"),
    ("requires the save and eval strategy to match", "set save_strategy to the same value as eval_strategy"),
    ("requires an eval strategy", "set eval_strategy (and eval_size) or pick another lr_scheduler_type"),
    ("is not a valid", "check the spelling of the value in the message"),
]


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------

RESERVED_KEYS = ("config", "env")  # `--config FILE` and the file's `env:` mapping are syntax, not options
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


@dataclass
class Option:
    name: str
    type: Any
    default: Any  # dataclasses.MISSING for a required option
    choices: tuple | None
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
                if not f.init:
                    continue
                if f.name in RESERVED_KEYS:
                    raise TypeError(f"{dc.__name__}.{f.name}: '{f.name}' is reserved by the config parser")
                if f.name in self.options:  # shared key: the first definition describes it
                    continue
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                else:
                    default = dataclasses.MISSING
                choices = f.metadata.get("choices")
                self.options[f.name] = Option(
                    f.name,
                    hints.get(f.name, Any),
                    default,
                    tuple(choices) if choices else None,
                    f.metadata.get("help", ""),
                )

    def require(self, key: str, where: str) -> Option:
        if key not in self.options:
            raise unknown_key_error(key, self.options, where)
        return self.options[key]


@functools.lru_cache(maxsize=32)
def schema_for(arg_types: tuple[type, ...]) -> Schema:
    return Schema(arg_types)


def option_names(arg_types: Sequence[type]) -> set[str]:
    """The keys a stage with these ARG_TYPES accepts (used by the recipe runner to route overrides)."""
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
    effective = {
        name: values[name][0] if name in values else opt.default
        for name, opt in schema.options.items()
        if name in values or opt.default is not dataclasses.MISSING
    }
    _check_ranges(values)
    _check_conflicts(effective, values)
    _check_model_config(values)
    return tuple(_instantiate(dc, values, source) for dc in schema.arg_types)


def split_argv(argv: Sequence[str], schema: Schema) -> tuple[str | None, list[tuple[str, str, str]]]:
    """Separates `--config FILE` from the overrides; returns (config path, [(key, value text, where)])."""
    config = None
    out: list[tuple[str, str, str]] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok == "--config" or tok.startswith("--config="):
            if config is not None:
                raise QuillError("--config is given twice", "pass one config file; override single keys as key=value")
            if tok == "--config":
                if nxt is None:
                    raise QuillError("--config needs a file path", "e.g. --config recipes/tiny/sft.yaml")
                config, i = nxt, i + 2
            else:
                config, i = tok.split("=", 1)[1], i + 1
            continue
        if tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                key, text = body.split("=", 1)
                out.append((key, text, f"argument '{tok}'"))
                i += 1
                continue
            key = body.replace("-", "_")
            opt = schema.options.get(key)
            if key == "debug" and (nxt is None or nxt.startswith("-") or "=" in nxt):
                # Bare --debug is Quill's "show tracebacks" flag (TrainingArguments' `debug` always takes a value).
                os.environ["QUILL_DEBUG"] = "1"
                i += 1
                continue
            if opt is not None and _is_bool(opt.type):
                if nxt is not None and nxt.lower() in _TRUE + _FALSE:
                    out.append((key, nxt, f"argument '{tok} {nxt}'"))
                    i += 2
                else:
                    out.append((key, "true", f"argument '{tok}'"))
                    i += 1
                continue
            if (
                opt is None
                and key.startswith("no_")
                and key[3:] in schema.options
                and _is_bool(schema.options[key[3:]].type)
            ):
                out.append((key[3:], "false", f"argument '{tok}'"))
                i += 1
                continue
            schema.require(key, f"argument '{tok}'")
            if nxt is None:
                raise QuillError(f"argument '{tok}' needs a value", f"e.g. {key}=VALUE")
            out.append((key, nxt, f"argument '{tok} {nxt}'"))
            i += 2
            continue
        if "=" in tok and not tok.startswith("-"):
            key, text = tok.split("=", 1)
            out.append((key, text, f"override '{tok}'"))
            i += 1
            continue
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
    text = p.read_text(encoding="utf-8")
    shown = display_path(p)
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
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # a non-text key; reported below
        line = key_node.start_mark.line + 1
        key = yaml.safe_load(key_node.value) if key_node.tag != "tag:yaml.org,2002:str" else key_node.value
        if key in lines:
            raise QuillError(f"{shown} line {line}: '{key}' is set twice (also on line {lines[key]})", "keep one")
        lines[key] = line
    values: dict[str, tuple[Any, str]] = {}
    env: dict[str, str] = {}
    for key, value in data.items():
        where = f"{shown} line {lines.get(key, '?')}"
        if not isinstance(key, str):
            raise QuillError(f"{where}: option names must be text, found {_show(key)}", "quote the key")
        if key == "env":
            if not isinstance(value, dict):
                raise QuillError(f"{where}: env must be a mapping of VARIABLE: value", "e.g. env: {HF_HUB_OFFLINE: 1}")
            env = {str(k): "" if v is None else str(v) for k, v in value.items()}
            continue
        if key == "config":
            raise QuillError(f"{where}: a config file cannot name another config file", "remove the 'config' key")
        values[key.replace("-", "_")] = (value, where)
    return ConfigFile(p, values, env)


def _apply_override(values: dict, schema: Schema, key: str, text: str, where: str) -> None:
    key = key.replace("-", "_")
    top, _, sub = key.partition(".")
    opt = schema.require(top, where)
    if not sub:
        values[top] = (_value_from_text(text, opt.type, where), where)
        return
    current = values[top][0] if top in values else opt.default
    if current is None or current is dataclasses.MISSING:
        current = {}
    if not isinstance(current, dict):
        raise QuillError(f"{where}: '{top}' is not a mapping, so '{key}' cannot set part of it", f"use {top}=VALUE")
    current = copy.deepcopy(current)
    node = current
    *parents, leaf = sub.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = _value_from_text(text, Any, where)
    values[top] = (current, where)


def _value_from_text(text: str, tp: Any, where: str) -> Any:
    """A command-line value: YAML, except for plain text options, which take the text as is (`name=007`)."""
    if _is_plain_str(tp):
        if text in ("null", "~") or (text == "" and _is_optional(tp)):
            return None
        return text
    if text == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        if _accepts_str(tp):
            return text
        raise QuillError(f"{where}: the value is not valid YAML", "quote it, e.g. key='[a, b]'") from None


# ---------------------------------------------------------------------------------------------------------------
# Type coercion: YAML gives us bool/int/float/str/list/dict; the dataclasses want their annotated types.
# ---------------------------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    pass


def coerce_option(opt: Option, value: Any, where: str) -> Any:
    try:
        out = _coerce(value, opt.type)
    except _Mismatch:
        fix = None
        names = _choice_names(opt.type)
        if names and isinstance(value, str):
            fix = did_you_mean(value, names)
        if fix is None and isinstance(value, str) and _is_number_type(opt.type):
            fix = f"write a number, e.g. {opt.name}: {opt.default if isinstance(opt.default, (int, float)) else 1}"
        raise QuillError(
            f"{where}: {opt.name}: expected {describe_type(opt.type)}, found {_show(value)}", fix
        ) from None
    if opt.choices and out is not None and out not in opt.choices:
        raise QuillError(
            f"{where}: {opt.name}: expected one of {', '.join(map(repr, opt.choices))}, found {_show(out)}",
            did_you_mean(str(out), [str(c) for c in opt.choices]),
        )
    return out


def _coerce(v: Any, tp: Any) -> Any:
    try:
        return _coerce_as(v, tp, strict=True)
    except _Mismatch:
        return _coerce_as(v, tp, strict=False)


def _coerce_as(v: Any, tp: Any, strict: bool) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or isinstance(tp, typing.TypeVar):
        return v
    if origin in (typing.Union, types.UnionType):
        members = list(args)
        # `SchedulerType | str`: transformers validates the text against the enum later; we check it now.
        if str in members and any(_is_enum(m) for m in members):
            members.remove(str)
        if strict:
            for m in members:
                try:
                    return _coerce_as(v, m, strict=True)
                except _Mismatch:
                    pass
            raise _Mismatch
        for m in sorted(members, key=lambda m: m is str):  # try str last: "5" should become 5 for `int | str`
            try:
                return _coerce(v, m)
            except _Mismatch:
                pass
        raise _Mismatch
    if tp is type(None):
        if v is None or (not strict and isinstance(v, str) and v.lower() in ("null", "none", "~")):
            return None
        raise _Mismatch
    if origin is Literal:
        for a in args:
            if v == a and type(v) is type(a):
                return a
        if not strict:
            text = _bool_word(v, [a for a in args if isinstance(a, str)]) if isinstance(v, bool) else str(v)
            for a in args:
                if isinstance(a, str) and text is not None and text.lower() == a.lower():
                    return a
        raise _Mismatch
    if _is_enum(tp):
        values = [m.value for m in tp]
        if isinstance(v, tp):
            return v.value
        if isinstance(v, str) and v in values:
            return v
        if not strict:
            text = _bool_word(v, [x for x in values if isinstance(x, str)]) if isinstance(v, bool) else str(v)
            for x in values:
                if text is not None and isinstance(x, str) and text.lower() == x.lower():
                    return x
        raise _Mismatch
    if tp is bool:
        if isinstance(v, bool):
            return v
        if not strict:
            if isinstance(v, str) and v.lower() in _TRUE + _FALSE:
                return v.lower() in _TRUE
            if isinstance(v, int) and v in (0, 1):
                return bool(v)
        raise _Mismatch
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if not strict and not isinstance(v, bool):
            try:
                f = float(v) if isinstance(v, (str, float)) else None
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if not strict and isinstance(v, str):
            try:  # PyYAML reads `1e-3` (no dot) as text
                return float(v)
            except ValueError:
                pass
        raise _Mismatch
    if tp is str:
        if isinstance(v, str):
            return v
        if not strict and isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        raise _Mismatch
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        item = args[0] if args else Any
        if isinstance(v, (list, tuple)):
            return [_coerce_as(x, item, strict) if strict else _coerce(x, item) for x in v]
        if not strict and v is not None and not isinstance(v, dict):
            return [_coerce(v, item)]
        raise _Mismatch
    if origin is dict or tp is dict:
        if isinstance(v, dict):
            return v
        if not strict and isinstance(v, str):
            try:
                parsed = json.loads(v)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(v, tp):
            return v
        if not strict and isinstance(v, dict):  # e.g. ParallelismConfig: let the dataclass decide
            return v
        raise _Mismatch
    return v


def describe_type(tp: Any) -> str:
    """`float`, `int or null`, `one of 'linear', 'cosine'`, `list of str`, ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        members = [m for m in args if m is not type(None)]
        if str in members and any(_is_enum(m) for m in members):
            members.remove(str)
        text = " or ".join(describe_type(m) for m in members)
        return text + (" or null" if type(None) in args else "")
    if tp is type(None):
        return "null"
    if origin is Literal or _is_enum(tp):
        return "one of " + ", ".join(repr(c) for c in _choice_names(tp))
    if tp is bool:
        return "true or false"
    if tp in (int, float, str):
        return tp.__name__
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _choice_names(tp: Any) -> list[str]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return [c for m in args for c in _choice_names(m)]
    if origin is Literal:
        return [str(a) for a in args]
    if _is_enum(tp):
        return [str(m.value) for m in tp]
    return []


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _is_plain_str(tp: Any) -> bool:
    return tp is str or (_is_optional(tp) and set(typing.get_args(tp)) == {str, type(None)})


def _accepts_str(tp: Any) -> bool:
    return tp is str or tp is Any or str in typing.get_args(tp)


def _is_bool(tp: Any) -> bool:
    return tp is bool or (_is_optional(tp) and set(typing.get_args(tp)) == {bool, type(None)})


def _is_number_type(tp: Any) -> bool:
    return tp in (int, float) or (_is_optional(tp) and any(a in (int, float) for a in typing.get_args(tp)))


def _bool_word(v: bool, choices: list[str]) -> str | None:
    # YAML 1.1 reads `eval_strategy: no` as false; map it back when the option has such a choice.
    for word in ("no", "false", "off") if v is False else ("yes", "true", "on"):
        if word in [c.lower() for c in choices]:
            return word
    return None


# ---------------------------------------------------------------------------------------------------------------
# Checks and construction
# ---------------------------------------------------------------------------------------------------------------


def _check_ranges(values: dict[str, tuple[Any, str]]) -> None:
    # Only values the user set: a library default outside our table is the library's business.
    for key, (ok, requirement) in RANGE_RULES.items():
        v, where = values.get(key, (None, ""))
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not ok(v):
            raise QuillError(f"{where}: {key} must be {requirement}, found {_show(v)}", f"change {key}")


def _check_conflicts(effective: dict[str, Any], values: dict[str, tuple[Any, str]]) -> None:
    for rule in CONFLICT_RULES:
        hit = rule(effective)
        if hit:
            keys, problem, fix = hit
            where = ", ".join(values[k][1] for k in keys if k in values)
            raise QuillError(f"conflicting options: {problem}" + (f" ({where})" if where else ""), fix)


def _check_model_config(values: dict[str, tuple[Any, str]]) -> None:
    """model_config keys are QuillConfig fields; QuillConfig itself accepts any key, so a typo would pass silently."""
    value, where = values.get("model_config", (None, ""))
    if not value:
        return
    try:
        from quill.model.configuration_quill import QuillConfig
    except ImportError:
        return
    known = {f.name for f in dataclasses.fields(QuillConfig)} if dataclasses.is_dataclass(QuillConfig) else set()
    for key in value:
        if known and key not in known:
            raise unknown_key_error(str(key), sorted(known), f"{where}: model_config")


def _instantiate(dc: type, values: dict[str, tuple[Any, str]], source: str) -> Any:
    names = [f.name for f in dataclasses.fields(dc) if f.init]
    kwargs = {name: values[name][0] for name in names if name in values}
    for f in dataclasses.fields(dc):
        if (
            f.init
            and f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise QuillError(f"{source}required option '{f.name}' is not set", f"add {f.name}: VALUE to the config")
    try:
        return dc(**kwargs)
    except QuillError as e:
        raise QuillError(f"{source}{e.problem}", e.fix) from None
    except (ValueError, TypeError) as e:
        message = one_line(e)
        fix = next((f for needle, f in POST_INIT_FIXES if needle in message), "change the options named in the message")
        raise QuillError(f"{source}invalid {dc.__name__} settings: {message}", fix) from None


def print_stage_help(arg_types: Sequence[type], prog: str | None = None) -> None:
    """Lists every option, its type, default and help, grouped by dataclass.

    Our own formatter: HfArgumentParser's refuses types argparse cannot express (`dict | None`, `list[dict | str]`).
    """
    import textwrap

    if prog is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        prog = f"python -m {spec.name}" if spec and spec.name != "__main__" else Path(sys.argv[0]).name
    print(f"usage: {prog} --config FILE [key=value ...] [--key value ...]\n")
    print("Options come from the YAML file given with --config; key=value (or --key value) overrides it.")
    seen: set[str] = set()
    for dc in arg_types:
        hints = typing.get_type_hints(dc)
        print(f"\n{dc.__name__}:")
        for f in dataclasses.fields(dc):
            if not f.init or f.name in seen:
                continue
            seen.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            head = f"  {f.name} ({describe_type(hints.get(f.name, Any))}, default {_show(default)})"
            print(head)
            text = " ".join(str(f.metadata.get("help", "")).split())
            if text:
                print(textwrap.fill(text, width=110, initial_indent="      ", subsequent_indent="      "))


# ---------------------------------------------------------------------------------------------------------------
# Small helpers shared with recipe.py and cli.py
# ---------------------------------------------------------------------------------------------------------------


def unknown_key_error(key: str, valid: Sequence[str] | dict, where: str, what: str = "key") -> QuillError:
    fix = did_you_mean(key, list(valid)) or "run the stage with --help to list the valid keys"
    return QuillError(f"{where}: unknown {what} '{key}'", fix)


def did_you_mean(word: str, choices: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in choices}
    if word.lower() in lower:
        return f"did you mean '{lower[word.lower()]}'?"
    guess = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{guess[0]}'?" if guess else None


def nearby_file_hint(p: Path) -> str:
    if p.parent.is_dir():
        names = [c.name for c in p.parent.iterdir() if c.suffix in (".yaml", ".yml")]
        guess = difflib.get_close_matches(p.name, names, n=1, cutoff=0.6)
        if guess:
            return f"did you mean '{p.parent / guess[0]}'?"
    return "check the path (relative paths start from the current directory)"


def display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def _show(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, enum.Enum):
        return repr(v.value)
    return json.dumps(v, default=str) if isinstance(v, (bool, type(None), list, dict)) else str(v)


__all__ = [
    "CONFLICT_RULES",
    "RANGE_RULES",
    "DataArguments",
    "ModelArguments",
    "RewardModelArguments",
    "RunArguments",
    "build_stage_args",
    "load_config_file",
    "normalize_dataset_mixture",
    "option_names",
    "parse_stage_args",
    "print_stage_help",
]
