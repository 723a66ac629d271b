"""Quill registered with transformers' Auto classes.

Importing this package makes `AutoModelForCausalLM.from_pretrained(quill_dir)` (and the other Auto classes below) work
without remote code, and `register_for_auto_class` makes every `save_pretrained` copy `configuration_quill.py` /
`modeling_quill.py` next to the weights, so the checkpoint also loads where Quill is not installed
(`trust_remote_code=True`).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_quill import QuillConfig
from .modeling_quill import (
    PACKED_ATTENTION,
    QuillForCausalLM,
    QuillForSequenceClassification,
    QuillModel,
    QuillPreTrainedModel,
)
from .modeling_quill_encoder import QuillForMaskedLM, QuillForQuestionAnswering, QuillForTokenClassification
from .modeling_quill_seq2seq import QuillForConditionalGeneration

AUTO_CLASSES = {
    AutoModel: QuillModel,
    AutoModelForCausalLM: QuillForCausalLM,
    AutoModelForMaskedLM: QuillForMaskedLM,
    AutoModelForSequenceClassification: QuillForSequenceClassification,
    AutoModelForTokenClassification: QuillForTokenClassification,
    AutoModelForQuestionAnswering: QuillForQuestionAnswering,
    AutoModelForSeq2SeqLM: QuillForConditionalGeneration,
}

AutoConfig.register("quill", QuillConfig, exist_ok=True)
QuillConfig.register_for_auto_class()
for auto_class, model_class in AUTO_CLASSES.items():
    auto_class.register(QuillConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)

__all__ = [
    "PACKED_ATTENTION",
    "QuillConfig",
    "QuillForCausalLM",
    "QuillForConditionalGeneration",
    "QuillForMaskedLM",
    "QuillForQuestionAnswering",
    "QuillForSequenceClassification",
    "QuillForTokenClassification",
    "QuillModel",
    "QuillPreTrainedModel",
]
