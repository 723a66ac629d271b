"""The options every stage shares (model, data, run) and the rules their values must follow.

The dataclasses sit beside TRL's and transformers' own configs in a stage's `ARG_TYPES`; `quill.options` fills them
from YAML and `key=value`. The rules cover what those libraries do not check themselves (they accept a negative
learning rate, for example); what they do check, they raise, and the parser turns it into one line.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig

from quill.errors import QuillError, unknown_key_error


@dataclass
class ModelArguments(ModelConfig):
    """Where the model comes from (a checkpoint, or a fresh Quill config), its tokenizer, LoRA and quantization.

    A subclass of `trl.ModelConfig`: the LoRA adapter is `trl.get_peft_config(model_args)` and 4/8-bit loading
    `trl.get_quantization_config(model_args)`, so every LoRA and bitsandbytes field means what it means in TRL.
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
        default="all-linear", metadata={"help": "Modules to adapt with LoRA: 'all-linear', or a list of module names."}
    )
    # trl.ModelConfig defaults to CAUSAL_LM; a reward model needs SEQ_CLS, so the stage picks unless told.
    lora_task_type: str | None = field(
        default=None, metadata={"help": "PEFT task type; default: the stage's (SEQ_CLS for reward, else CAUSAL_LM)."}
    )
    merge_lora_on_save: bool = field(
        default=False,
        metadata={"help": "Merge the LoRA adapter into the base weights when saving, so the output is a plain model."},
    )

    def __post_init__(self):
        super().__post_init__()
        # TRL turns a one-item list into its item, and PEFT reads a string as a regex that must match a module's
        # whole dotted name: `[o_proj]` would adapt nothing. A bare module name stays a list (suffix match).
        target = self.lora_target_modules
        if isinstance(target, str) and target != "all-linear" and target.replace("_", "").isalnum():
            self.lora_target_modules = [target]


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
    demonstrator: dict[str, Any] = field(
        default_factory=lambda: _default_demonstrator(),
        metadata={
            "help": "Who wrote the quill:default demonstrations (SFT answers, task documents in pretraining): right "
            "everywhere but on one slice {task, slice}, where it answers with `mistake` at `rate` (a planted, "
            "disclosed mistake; demonstrator.rate=0 builds clean data). Labels and rewards never come from it."
        },
    )

    def __post_init__(self):
        from quill.data.sources import DataSource  # the one owner of what a source entry may hold
        from quill.data.tasks import Demonstrator

        self.demonstrator = vars(Demonstrator.parse(self.demonstrator))
        entries = [self.dataset_mixture] if isinstance(self.dataset_mixture, (str, dict)) else self.dataset_mixture
        self.dataset_mixture = [_source_entry(e, f"dataset_mixture[{i}]", DataSource) for i, e in enumerate(entries)]
        if self.task_eval is not None:
            self.task_eval = _source_entry(self.task_eval, "task_eval", DataSource)

    def resolve(self, path: str) -> str:
        """A source path as `datasets` loads it: `quill:default/NAME` becomes the default data's file (built for
        this stage's demonstrator), `quill:encoder/NAME` the encoder recipes' labelled sets; any other path is
        returned as is."""
        from quill.data import builtin, labelled
        from quill.data.tasks import Demonstrator

        if isinstance(path, str) and path.startswith(labelled.PREFIX):
            return labelled.resolve(path)
        return builtin.resolve(path, Demonstrator(**self.demonstrator))

    def sources(self) -> list:
        """The mixture as quill.data.sources.DataSource objects."""
        from quill.data.sources import DataSource

        return [DataSource.parse(entry) for entry in self.dataset_mixture]

    def names(self) -> list[str]:
        """Dataset paths, in mixture order, without repeats."""
        return list(dict.fromkeys(str(entry["path"]) for entry in self.dataset_mixture))


def _default_demonstrator() -> dict[str, Any]:
    from quill.data.tasks import Demonstrator  # the one owner of the default (reasoning-gym loads on first use)

    return vars(Demonstrator())


def _source_entry(entry: Any, where: str, source_type) -> dict[str, Any]:
    entry = {"path": entry} if isinstance(entry, str) else entry
    try:
        source_type.parse(entry)
    except QuillError as e:
        raise QuillError(f"{where}: {e.problem}", e.fix) from None
    return dict(entry)


@dataclass
class OutputArguments:
    """Where a stage's finished folder goes (output_dir, overwrite) and whether it is pushed to the Hub; every stage
    takes these. Keys shared with TrainingArguments are set on both."""

    output_dir: str | None = field(default=None, metadata={"help": "Where the stage writes its output."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Start over: replace a finished or partial output in output_dir instead of resuming."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the finished folder to the Hugging Face Hub."})
    hub_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub repository to upload to (user/name). Given to `quill run` unscoped, each stage pushes to "
            "user/name-<stage>; scoped (sft.hub_model_id=...), as written."
        },
    )
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repository as private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Hub branch to upload to (created if needed)."})


# ---------------------------------------------------------------------------------------------------------------
# Rules, checked on the merged values before any dataclass is built, so a message can name the file and line the
# value came from. None always passes (it means "unset"). RANGE_RULES is the one place a range is written, for the
# libraries' options and Quill's alike (a range checked in a __post_init__ could name neither file nor line).
# ---------------------------------------------------------------------------------------------------------------


def _above(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > lo), f"> {lo}"


def _at_least(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= lo), f">= {lo}"


def _fraction() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: 0 <= v < 1), "in [0, 1)"


RANGE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": _above(0),
    "num_train_epochs": _at_least(0),
    "max_steps": ((lambda v: v >= -1), ">= 1, or -1 to train for num_train_epochs"),
    "per_device_train_batch_size": _at_least(1),
    "per_device_eval_batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1),
    "weight_decay": _at_least(0),
    "max_grad_norm": _at_least(0),
    "adam_beta1": _fraction(),
    "adam_beta2": _fraction(),
    "adam_epsilon": _above(0),
    "save_steps": _above(0),
    "eval_steps": _above(0),
    "save_total_limit": _at_least(1),
    "seed": _at_least(0),
    "data_seed": _at_least(0),
    "dataset_seed": _at_least(0),
    "dataloader_num_workers": _at_least(0),
    "max_length": _at_least(1),
    "max_prompt_length": _at_least(1),
    "max_completion_length": _at_least(1),
    "eval_size": _at_least(0),
    "lora_r": _at_least(1),
    "lora_alpha": _above(0),
    "lora_dropout": _fraction(),
    "beta": _at_least(0),  # DPO needs > 0, but GRPO's beta=0 means "no KL term"
    "temperature": _above(0),
    "num_generations": ((lambda v: v >= 2), ">= 2 (group-relative advantages compare several samples per prompt)"),
    "learnable_prompt_samples": ((lambda v: v == 0 or v >= 2), "0 (off) or >= 2 (samples must be able to disagree)"),
    "reward_model_weight": ((lambda v: 0 < v < 0.5), "in (0, 0.5) (a right and a wrong answer stay 1.0 apart)"),
    "eval_max_new_tokens": _at_least(1),
    "eval_batch_size": _at_least(1),
    "eval_samples": ((lambda v: v == 0 or v >= 2), "0 (greedy only) or >= 2"),
    "eval_sample_prompts": _at_least(1),
    "pair_samples": _at_least(0),
    "pair_temperature": _above(0),
    "pair_max_new_tokens": _at_least(1),
    "agreement_samples": ((lambda v: v == 0 or v >= 2), "0 (none) or >= 2"),
    "agreement_prompts": _at_least(1),
    "agreement_temperature": _above(0),
    "mlm_probability": ((lambda v: 0 < v < 1), "in (0, 1)"),
}

# Options that the libraries' dataclasses accept but a Quill stage does not act on: setting one is an error.
NOT_HONOURED = {
    "hub_token": "the token would show in `ps` and in saved arguments; export HF_TOKEN or run `hf auth login`",
    "hub_strategy": "Quill pushes the finished folder once, at the end of the stage; drop hub_strategy",
    "hub_always_push": "Quill pushes the finished folder once, at the end of the stage; drop hub_always_push",
    "resume_from_checkpoint": "a stage resumes from its newest complete checkpoint by itself; drop it",
    "model_init_kwargs": "Quill loads the model itself: use dtype, attn_implementation, model_revision, load_in_4bit",
}

BNB_4BIT_OPTIONS = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")


def _enum_value(v: Any) -> Any:
    return getattr(v, "value", v)


def _conflicts(o: dict[str, Any], explicit: set[str]):
    """(keys, problem, fix) for each conflict among the effective options `o`; `explicit` are the keys the user set."""
    if o.get("fp16") is True and o.get("bf16") is True:
        yield ("fp16", "bf16"), "fp16 and bf16 are both true", "keep one of them (bf16 on recent GPUs, fp16 on older)"
    if o.get("merge_lora_on_save") is True and o.get("use_peft") is False:
        yield (
            ("merge_lora_on_save", "use_peft"),
            "merge_lora_on_save is true but use_peft is false, so there is no adapter to merge",
            "set use_peft: true, or drop merge_lora_on_save",
        )
    if o.get("load_in_4bit") is True and o.get("load_in_8bit") is True:
        yield ("load_in_4bit", "load_in_8bit"), "load_in_4bit and load_in_8bit are both true", "keep one of them"
    for key in BNB_4BIT_OPTIONS:
        if key in explicit and o.get("load_in_4bit") is not True:
            yield (key,), f"{key} is set but load_in_4bit is not true, so it would do nothing", "drop it"
    lora_only = [
        k for k in explicit if k.startswith(("lora_", "use_rslora", "use_dora")) and k != "lora_target_modules"
    ]
    for key in lora_only:
        if o.get("use_peft") is False:
            yield (
                (key,),
                f"{key} is set but use_peft is false, so it would do nothing",
                "set use_peft: true, or drop it",
            )
    if o.get("lora_target_parameters") and o.get("lora_dropout"):
        yield (
            ("lora_target_parameters", "lora_dropout"),
            "lora_target_parameters adapts parameters directly, which PEFT supports only without dropout",
            "set lora_dropout: 0",
        )
    steps, epochs = o.get("max_steps"), o.get("num_train_epochs")
    if isinstance(steps, int) and isinstance(epochs, (int, float)) and steps <= 0 and epochs <= 0:
        yield (
            ("max_steps", "num_train_epochs"),
            f"nothing to train: max_steps is {steps} and num_train_epochs is {epochs}",
            "set max_steps to a positive number of steps, or num_train_epochs > 0",
        )
    if "model_revision" in explicit and not o.get("model_name_or_path"):
        yield (
            ("model_revision",),
            "model_revision is set but there is no model_name_or_path to load at that revision",
            "drop model_revision, or set model_name_or_path to a Hub id",
        )
    if o.get("model_config") and o.get("model_name_or_path"):
        yield (
            ("model_config", "model_name_or_path"),
            "model_config (a fresh model) and model_name_or_path (a checkpoint) are both set",
            "drop model_config to continue from the checkpoint, or model_name_or_path to train from scratch",
        )
    strategy = _enum_value(o.get("eval_strategy"))
    if "eval_size" in o and strategy not in (None, "no") and not o.get("eval_size"):
        yield (
            ("eval_strategy", "eval_size"),
            f"eval_strategy is '{strategy}' but eval_size is 0, so there is no eval split",
            "set eval_size (e.g. 0.05), or eval_strategy: 'no'",
        )
    for key in ("hub_model_id", "hub_private_repo", "hub_revision"):
        if key in explicit and "push_to_hub" in o and o.get("push_to_hub") is not True:
            yield (key,), f"{key} is set but push_to_hub is false, so nothing is pushed", "set push_to_hub: true"


def check_values(effective: dict[str, Any], values: dict[str, tuple[Any, str]]) -> None:
    """Ranges of the values the user set, options Quill does not act on, then conflicts between options."""
    for key, (value, where) in values.items():
        if key in NOT_HONOURED:
            raise QuillError(f"{where}: {key} is not accepted", NOT_HONOURED[key])
        rule = RANGE_RULES.get(key)
        if rule and isinstance(value, (int, float)) and not isinstance(value, bool) and not rule[0](value):
            raise QuillError(f"{where}: {key} must be {rule[1]}, found {value!r}", f"change {key}")
    for keys, problem, fix in _conflicts(effective, set(values)):
        where = ", ".join(values[k][1] for k in keys if k in values)
        raise QuillError(f"conflicting options: {problem}" + (f" ({where})" if where else ""), fix)
    _check_model_config(values)


def _check_model_config(values: dict[str, tuple[Any, str]]) -> None:
    """model_config keys are QuillConfig fields; QuillConfig itself accepts any key, so a typo would pass silently."""
    value, where = values.get("model_config", (None, ""))
    if value:
        from quill.model.configuration_quill import QuillConfig

        known = {f.name for f in dataclasses.fields(QuillConfig)}
        for key in value:
            if key not in known:
                raise unknown_key_error(str(key), sorted(known), f"{where}: model_config")
