"""The smallest real Quill for tests that need weights and a tokenizer, not a trained model: Quill's own tokenizer
(special tokens, chat template) trained on a few sentences, and a 64-wide model, both built in milliseconds."""

import torch

from quill.data.tokenizer import train_tokenizer
from quill.model import QuillConfig, QuillForCausalLM


def tiny_tokenizer():
    text = ["the quick brown fox jumps over the lazy dog", "what is two plus two? four."] * 20
    return train_tokenizer(text, vocab_size=300, min_frequency=1)


def tiny_config(tokenizer, **overrides) -> QuillConfig:
    ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    fields = {"depth": 2, "hidden_size": 64, "num_attention_heads": 2, "vocab_size": len(tokenizer), **ids}
    return QuillConfig(**{**fields, **overrides})


def save_checkpoint(path, seed: int = 0, cls=QuillForCausalLM, tokenizer=None, **overrides):
    """A random tiny Quill folder saved the way a stage saves it (weights, config, model code, tokenizer)."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    model = cls(tiny_config(tokenizer, **overrides))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer
