"""Load the tokenizer and model a stage starts from: a previous stage's folder, a Hub id, or a fresh Quill config."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import quill.model  # noqa: F401  registers Quill with the Auto classes, so no remote code is needed here
from quill.model import QuillConfig, QuillForCausalLM
from quill.errors import QuillError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Any tokenizer folder or Hub id; the chat template is required because every later stage talks in chat."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise QuillError(f"tokenizer '{name_or_path}' could not be loaded ({first_line(err)})",
                         fix="point tokenizer_name_or_path at a tokenizer folder or Hub id") from err
    if tokenizer.pad_token is None:
        # Padding is needed for batched eval and reward models; EOS is the conventional stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_path(path: str) -> None:
    """A local path that is not a finished model folder is almost always a missing previous stage."""
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or p.exists() or path.count("/") != 1
    if looks_local and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise QuillError(f"model '{path}' has no config.json (previous stage missing or unfinished)",
                         fix="run the previous stage first, or set model_name_or_path to a model folder or Hub id")


def load_model(model_args, tokenizer, task: str = "causal-lm"):
    """Load `model_args.model_name_or_path`, or build a fresh Quill from `model_args.model_config` (pretraining)."""
    dtype = DTYPES.get(getattr(model_args, "dtype", None) or "float32", torch.float32)
    attn = getattr(model_args, "attn_implementation", None)
    if not model_args.model_name_or_path:
        if task != "causal-lm":
            raise QuillError("a reward model needs model_name_or_path", fix="start it from the SFT stage's output")
        config = QuillConfig(
            **(model_args.model_config or {}),
            vocab_size=_padded_vocab(len(tokenizer)),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = QuillForCausalLM(config)
        if attn:
            model.set_attn_implementation(attn)
        return model.to(dtype) if dtype != "auto" else model

    path = model_args.model_name_or_path
    check_model_path(path)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    extra = {"num_labels": 1} if task != "causal-lm" else {}
    try:
        model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                     trust_remote_code=model_args.trust_remote_code, **extra)
    except OSError as err:
        raise QuillError(f"model '{path}' could not be loaded ({first_line(err)})",
                         fix="check the path or Hub id; a corrupted model.safetensors must be restored or retrained") from err
    check_vocab(model, tokenizer, path)
    if task != "causal-lm":
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def check_vocab(model, tokenizer, where: str) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise QuillError(f"tokenizer has {len(tokenizer)} tokens but model '{where}' has a vocabulary of {vocab}",
                         fix="use the tokenizer the model was trained with (tokenizer_name_or_path)")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _padded_vocab(n: int, multiple: int = 64) -> int:
    # Embedding rows padded to a multiple of 64: matmul-friendly shapes; the extra rows are never sampled in practice.
    return -(-n // multiple) * multiple
