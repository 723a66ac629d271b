"""Load what a stage starts from: the tokenizer, and the model (a checkpoint, a Hub id, or a fresh Quill config),
with its LoRA adapter config and 4/8-bit quantization built by TRL's own helpers from the model arguments.

Every model a stage computes with is loaded here and placed on the training device (`place`): the trained policy,
and the models used outside the Trainer (`load_for_inference`: reward model, judge, reference, the policy's sampling
copy, `quill eval`'s model), so none of them runs on the CPU in fp32 beside a GPU trainer."""

import os
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

import quill.model  # noqa: F401  registers Quill with the Auto classes, so no remote code is needed here
from quill.errors import QuillError, one_line
from quill.hub import is_hub_id
from quill.model import AUTO_CLASSES, QuillConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
CAUSAL_LM, CLASSIFIER = "causal-lm", "classifier"
MASKED_LM, TOKEN_CLASSIFIER, QUESTION_ANSWERING = "masked-lm", "token-classifier", "question-answering"
SEQ2SEQ_LM = "seq2seq-lm"
POLICY = "policy"  # the model a stage trains; every other kind is a frozen model used outside the Trainer


class Task(NamedTuple):
    name: str
    auto: type  # the Auto class that loads (or builds from a config) this kind of model
    peft_task_type: str | None  # PEFT's task type for LoRA on it; None is PEFT's generic model (forwards labels)
    head: dict  # from_pretrained / config kwargs of its head: a classifier is a 1-output reward head unless told

    def with_head(self, **head) -> "Task":
        """The same task with its own head, e.g. TASKS[CLASSIFIER].with_head(id2label=..., label2id=...); with no
        arguments, the head a checkpoint was saved with."""
        return self._replace(head=head)


# What a stage's `task` loads: one row per kind of model (causal LM, reward/label classifier, encoder heads). A stage
# passes a name from here, or a Task (e.g. with its own head).
TASKS = {
    CAUSAL_LM: Task(CAUSAL_LM, AutoModelForCausalLM, "CAUSAL_LM", {}),
    CLASSIFIER: Task(CLASSIFIER, AutoModelForSequenceClassification, "SEQ_CLS", {"num_labels": 1}),
    MASKED_LM: Task(MASKED_LM, AutoModelForMaskedLM, None, {}),
    TOKEN_CLASSIFIER: Task(TOKEN_CLASSIFIER, AutoModelForTokenClassification, "TOKEN_CLS", {}),
    QUESTION_ANSWERING: Task(QUESTION_ANSWERING, AutoModelForQuestionAnswering, "QUESTION_ANS", {}),
    # An encoder-decoder; is_encoder_decoder makes a fresh QuillConfig a QuillForConditionalGeneration's.
    SEQ2SEQ_LM: Task(SEQ2SEQ_LM, AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM", {"is_encoder_decoder": True}),
}


def task_spec(task: "str | Task") -> Task:
    return task if isinstance(task, Task) else TASKS[task]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """Any tokenizer folder or Hub id; a pad token is required for batching (EOS stands in when there is none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision or None
        )
    except (OSError, ValueError) as err:
        raise QuillError(
            f"tokenizer '{name_or_path}' could not be loaded ({one_line(err, 200)})",
            "point tokenizer_name_or_path at a tokenizer folder or Hub id",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_path(path: str) -> None:
    """A path that is neither a model folder nor a Hub id is almost always a missing previous stage."""
    p = Path(path)
    if (p / "config.json").exists() or (p / "adapter_config.json").exists() or (is_hub_id(path) and not p.exists()):
        return
    raise QuillError(
        f"model '{path}' has no config.json (previous stage missing or unfinished)",
        "run the previous stage first, or set model_name_or_path to a model folder or Hub id",
    )


def load_model(model_args, tokenizer, task: "str | Task" = CAUSAL_LM, kind: str = POLICY):
    """Load `model_args.model_name_or_path` as a `task` model (a TASKS name, or a Task with its own head), or build a
    fresh Quill of that task from `model_args.model_config` (training from scratch), placed on the training device
    (see `place`; `kind` says what the model is for)."""
    dtype = DTYPES[getattr(model_args, "dtype", None) or "float32"]
    attn = getattr(model_args, "attn_implementation", None)
    task = task_spec(task)
    auto, head = task.auto, task.head
    if not model_args.model_name_or_path:
        quantization_config(model_args)  # refuses 4/8-bit here: a fresh model has no pretrained weights to quantize
        if "vocab_size" in (model_args.model_config or {}):
            raise QuillError(
                "model_config.vocab_size is set, but the tokenizer decides the vocabulary",
                "drop vocab_size from model_config (the tokenizer stage's vocab_size sets it)",
            )
        try:
            config = QuillConfig(
                **(model_args.model_config or {}),
                vocab_size=_padded_vocab(len(tokenizer)),
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **head,
            )
            # The Quill class itself, not `auto.from_config`: under ZeRO-3 from_config builds inside
            # deepspeed.zero.Init, which draws the initial weights per shard, so a sharded run would start from other
            # weights than one process does (tests/test_distributed.py compares the two).
            model = AUTO_CLASSES[auto](config)
        except ValueError as err:  # an option outside its choices, or a head the architecture refuses
            raise QuillError(
                f"model_config: {one_line(err, 300)}", "fix model_config (QuillConfig lists the choices)"
            ) from None
        if attn:
            model.set_attn_implementation(attn)
        return place(model.to(dtype) if dtype != "auto" else model, kind)

    path = model_args.model_name_or_path
    check_model_path(path)
    extra = dict(head)
    quantization = quantization_config(model_args)
    if quantization is not None:
        extra |= {"quantization_config": quantization, "device_map": _kbit_device_map()}
    try:
        model = auto.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attn,
            revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code,
            **extra,
        )
    except OSError as err:
        raise QuillError(
            f"model '{path}' could not be loaded ({one_line(err, 200)})",
            "check the path or Hub id; a corrupted model.safetensors must be restored or retrained",
        ) from None
    check_tokenizer_fits(model, tokenizer, path)
    if task.name != CAUSAL_LM:
        model.config.pad_token_id = tokenizer.pad_token_id
    return place(model, kind)


def load_for_inference(path: str, model_args, kind: str, tokenizer, task: "str | Task" = CAUSAL_LM):
    """A model a stage computes with outside its Trainer (`kind`: reward, judge, reference, teacher, sampler, eval),
    in eval mode on the training device, with the dtype and attention backend of the stage's model arguments
    (`model_args` None: float32, the model's default attention). Its revision applies only to the stage's own
    model; LoRA and 4/8-bit are the trained model's, never a frozen helper's."""
    same = model_args is not None and path == model_args.model_name_or_path
    args = SimpleNamespace(
        model_name_or_path=path,
        model_config=None,
        dtype=getattr(model_args, "dtype", None) or "float32",
        attn_implementation=getattr(model_args, "attn_implementation", None),
        model_revision=model_args.model_revision if same else None,
        trust_remote_code=bool(getattr(model_args, "trust_remote_code", False)),
        load_in_4bit=False,
        load_in_8bit=False,
    )
    return load_model(args, tokenizer, task=task, kind=kind).eval()


def training_device():
    """The device this process trains on: accelerate's, which the stage's TrainingArguments set up when parsed
    (cuda:LOCAL_RANK on a GPU, cpu with use_cpu or without one), so the Trainer uses the same."""
    from accelerate.state import PartialState

    return PartialState().device


def place(model, kind: str):
    """Move `model` to `training_device()`, except where something else owns its placement:

    - loaded with a device_map (4/8-bit, or spread over devices): already placed, and bitsandbytes weights refuse
      `.to()`;
    - ZeRO-3: from_pretrained partitioned the weights at load (zero.Init), and `.to()` would move empty shards;
    - the trained policy under FSDP: the Trainer leaves it where it is and FSDP shards it from there (loading the
      full model onto every GPU first is what sharding avoids). Frozen helpers are nobody's to shard: they move.
    The Trainer moves the policy to the same device itself; placing it now means what a stage computes with it
    before the Trainer exists (RL's start eval, pair building) already runs there."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if getattr(model, "hf_device_map", None) or getattr(model, "hf_quantizer", None) is not None:
        return model
    if is_deepspeed_zero3_enabled():
        return model
    # How quill.stages.distributed detects an FSDP launch (accelerate and TrainingArguments(fsdp=...) both set it).
    if kind == POLICY and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return model
    return model.to(training_device())


def check_tokenizer_fits(model, tokenizer, where: str) -> None:
    """The tokenizer must be the one the model was trained with: it fits the embedding, and the special tokens the
    model was configured with (pad, bos, eos) have the same ids in the tokenizer."""
    vocab = model.get_input_embeddings().weight.shape[0]
    fix = "use the tokenizer the model was trained with (tokenizer_name_or_path)"
    # Quill pads its embedding to a multiple of 64 rows; more spare rows than that means another tokenizer.
    too_small = model.config.model_type == "quill" and vocab - len(tokenizer) >= 64
    if len(tokenizer) > vocab or too_small:
        raise QuillError(f"tokenizer has {len(tokenizer)} tokens but model '{where}' has a vocabulary of {vocab}", fix)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        expected, actual = getattr(model.config, name, None), getattr(tokenizer, name, None)
        if isinstance(expected, list):
            expected = expected[0] if expected else None
        if expected is not None and actual is not None and expected != actual:
            raise QuillError(f"tokenizer's {name} is {actual} but model '{where}' was configured with {expected}", fix)


def peft_config(model_args, task: "str | Task" = CAUSAL_LM):
    """TRL's LoRA config from the model arguments; the task type follows the stage unless the user set it."""
    from trl import get_peft_config

    stage_task = task_spec(task).peft_task_type
    if model_args.use_peft and model_args.lora_task_type not in (None, stage_task):
        raise QuillError(
            f"lora_task_type is {model_args.lora_task_type} but this stage trains a {task_spec(task).name} model",
            f"drop lora_task_type, or set it to {stage_task}" if stage_task else "drop lora_task_type",
        )
    model_args.lora_task_type = stage_task
    return get_peft_config(model_args)


def quantization_config(model_args):
    """TRL's bitsandbytes config for load_in_4bit / load_in_8bit (QLoRA), or None."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuillError("load_in_4bit / load_in_8bit need bitsandbytes", "pip install 'quill[qlora]'") from None
    if not model_args.model_name_or_path:
        raise QuillError(
            "4/8-bit loading applies to a pretrained checkpoint, not a model trained from scratch",
            "drop load_in_4bit / load_in_8bit for pretraining",
        )
    from trl import get_quantization_config

    return get_quantization_config(model_args)


def _kbit_device_map() -> dict:
    import os

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def _padded_vocab(n: int, multiple: int = 64) -> int:
    # Embedding rows padded to a multiple of 64: matmul-friendly shapes; the extra rows are never sampled in practice.
    return -(-n // multiple) * multiple
