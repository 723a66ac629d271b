"""Quill's encoder-only heads (``is_decoder=False``): masked LM, token classification and extractive QA.

The sequence classifier, which decoders use too, lives in ``modeling_quill.py``. ``modeling_quill.py`` names this
file in ``encoder_heads()``, so every checkpoint carries it beside its own model file.
"""

import torch
from torch import nn
from transformers.modeling_layers import GenericForQuestionAnswering, GenericForTokenClassification
from transformers.modeling_outputs import BaseModelOutputWithPast, MaskedLMOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_quill import QuillConfig
from .modeling_quill import QuillModel, QuillPreTrainedModel


class QuillForMaskedLM(QuillPreTrainedModel):
    """An encoder with a linear head over the vocabulary, tied to the input embeddings when
    ``tie_word_embeddings``; the loss is transformers' masked-LM loss over labels != -100 (what
    ``DataCollatorForLanguageModeling`` sets for unmasked tokens)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QuillConfig):
        if config.is_decoder:
            raise ValueError(
                "QuillForMaskedLM needs an encoder config (is_decoder=False): a causal decoder cannot see the tokens "
                "after a mask; a decoder's language-model head is QuillForCausalLM"
            )
        super().__init__(config)
        self.model = QuillModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class QuillForTokenClassification(GenericForTokenClassification, QuillPreTrainedModel):
    """A label per token (dropout, then a linear ``score``); transformers' generic forward and loss."""

    def __init__(self, config: QuillConfig):
        QuillPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = QuillModel(config)
        dropout = getattr(config, "classifier_dropout", None)  # BERT's 0.1 unless the config sets one
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class QuillForQuestionAnswering(GenericForQuestionAnswering, QuillPreTrainedModel):
    """Extractive QA as in BERT: start and end logits per token from one linear ``qa_outputs``; the loss is the mean
    of the start and end cross-entropies against ``start_positions`` / ``end_positions``. transformers' generic
    forward and loss. ``pipeline("question-answering")`` runs ``pipeline_class()`` (see pipeline_quill.py)."""

    @staticmethod
    def pipeline_class():
        # A relative import: transformers copies it beside every checkpoint with this file (it is read lazily, so
        # loading a model does not import transformers' pipeline machinery).
        from .pipeline_quill import QuillQuestionAnsweringPipeline

        return QuillQuestionAnsweringPipeline

    def __init__(self, config: QuillConfig):
        QuillPreTrainedModel.__init__(self, config)
        self.model = QuillModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


__all__ = ["QuillForMaskedLM", "QuillForQuestionAnswering", "QuillForTokenClassification"]
