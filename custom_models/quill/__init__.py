"""Quill registered with transformers' Auto classes.

Importing this package makes `AutoModelForCausalLM.from_pretrained(quill_dir)` work without remote code, and
`register_for_auto_class` makes every `save_pretrained` copy `configuration_quill.py` / `modeling_quill.py` next
to the weights, so the checkpoint also loads where Quill is not installed (`trust_remote_code=True`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_quill import QuillConfig
from .modeling_quill import (
    PACKED_ATTENTION,
    QuillForCausalLM,
    QuillForSequenceClassification,
    QuillModel,
    QuillPreTrainedModel,
)

AutoConfig.register("quill", QuillConfig, exist_ok=True)
AutoModel.register(QuillConfig, QuillModel, exist_ok=True)
AutoModelForCausalLM.register(QuillConfig, QuillForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(QuillConfig, QuillForSequenceClassification, exist_ok=True)

QuillConfig.register_for_auto_class()
QuillModel.register_for_auto_class("AutoModel")
QuillForCausalLM.register_for_auto_class("AutoModelForCausalLM")
QuillForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "PACKED_ATTENTION",
    "QuillConfig",
    "QuillForCausalLM",
    "QuillForSequenceClassification",
    "QuillModel",
    "QuillPreTrainedModel",
]
