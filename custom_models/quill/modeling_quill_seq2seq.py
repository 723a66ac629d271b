"""Quill as an encoder-decoder (seq2seq) transformer, in the shape of transformers' T5/BART modeling files.

One ``QuillConfig`` with ``is_encoder_decoder=True`` describes both halves (``num_hidden_layers`` encoder layers,
``num_decoder_layers`` decoder layers, default the same; ``decoder_start_token_id`` defaults to BOS). The encoder is
Quill's block with bidirectional attention (padding masked); each decoder layer is causal self-attention ->
cross-attention to the encoder states -> MLP. Encoder, decoder and LM head share one embedding. The config's
``norm_position``, ``norm_type``, ``hidden_act`` and ``position_embedding`` (rope, learned, sinusoidal; not alibi)
apply to both halves as in the decoder-only Quill. Generation goes through transformers' ``generate()`` with an
``EncoderDecoderCache``: the self-attention cache grows per step, the cross-attention keys/values are computed once
from the encoder states and reused.

The blocks (attention, MLP, norms, position encodings) are imported from ``modeling_quill.py``; this file travels
beside it in every checkpoint (with ``pipeline_quill_seq2seq.py``, the translation pipeline), so it imports its
siblings relatively and nothing from the ``quill`` package.
"""

import copy
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import ForMaskedLMLoss
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPast, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from .configuration_quill import QuillConfig
from .modeling_quill import (
    CACHE_FIELD,
    QuillAttention,
    QuillDecoderLayer,
    QuillPreTrainedModel,
    QuillRotaryEmbedding,
    QuillSinusoidalEmbedding,
    deprecate_past_key_values,
    eager_attention_forward,
    final_norm,
    quill_mlp,
    quill_norm,
)
from .pipeline_quill_seq2seq import CUSTOM_PIPELINES  # imported so that save_pretrained copies the pipeline file

# The Auto classes a seq2seq checkpoint loads as. They replace the decoder-only entries QuillConfig starts with
# (AutoModelForCausalLM would build a decoder without the encoder's weights from a seq2seq folder).
SEQ2SEQ_AUTO_MAP = {
    "AutoConfig": "configuration_quill.QuillConfig",
    "AutoModel": "modeling_quill_seq2seq.QuillSeq2SeqModel",
    "AutoModelForSeq2SeqLM": "modeling_quill_seq2seq.QuillForConditionalGeneration",
}


def check_seq2seq_config(config: QuillConfig) -> None:
    """Make `config` a seq2seq config (flag, start token, layer counts, auto_map); refuse what this model would not
    honour. Called by every seq2seq module's __init__, so a config built for it any way is checked the same."""
    if getattr(config, "position_embedding", "rope") == "alibi":
        raise ValueError(
            "QuillForConditionalGeneration supports position_embedding rope, learned or sinusoidal, not alibi "
            "(cross-attention has no distance to penalise)"
        )
    if not getattr(config, "is_decoder", True):
        raise ValueError("is_decoder describes the decoder half of a seq2seq Quill and must stay true")
    if not config.tie_word_embeddings:
        raise ValueError("QuillForConditionalGeneration shares one embedding (tie_word_embeddings must be true)")
    config.is_encoder_decoder = True
    if getattr(config, "decoder_start_token_id", None) is None:
        # T5's convention is pad; Quill tokenizers have a BOS that opens every sequence, so the decoder starts there.
        config.decoder_start_token_id = config.bos_token_id if config.bos_token_id is not None else config.pad_token_id
    if getattr(config, "num_decoder_layers", None) is None:
        config.num_decoder_layers = config.num_hidden_layers
    # Keep an entry that already names the seq2seq class (loaded from the Hub it reads "org/repo--module.Class").
    current = config.auto_map or {}
    config.auto_map = {k: current[k] if current.get(k, "").endswith(v) else v for k, v in SEQ2SEQ_AUTO_MAP.items()}
    # pipeline("translation") / ("text2text-generation") through the checkpoint's own pipeline (removed upstream in
    # transformers 5.24); a fresh copy, since pipeline() replaces the class names in it with classes.
    config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)


class QuillPositions(nn.Module):
    """The config's position encoding for one stack, as QuillModel applies it: RoPE returns (cos, sin) for attention;
    learned and sinusoidal encodings are added to the embeddings and return None."""

    def __init__(self, config: QuillConfig):
        super().__init__()
        self.kind = getattr(config, "position_embedding", "rope")
        if self.kind == "rope":
            self.rotary_emb = QuillRotaryEmbedding(config)
        elif self.kind == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.embed_positions = QuillSinusoidalEmbedding(config)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        if self.kind == "rope":
            return hidden_states, self.rotary_emb(hidden_states, position_ids)
        if self.kind == "learned":
            return hidden_states + self.embed_positions(position_ids), None
        return self.embed_positions(hidden_states, position_ids), None


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher forcing: the decoder reads the start token then the target shifted by one (-100 becomes pad)."""
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


class QuillCrossAttention(nn.Module):
    """Decoder queries over the encoder states: GQA and QK-norm as in self-attention, no RoPE (the source positions
    are already encoded in the encoder states). Keys/values are computed once per source and kept in the cache."""

    def __init__(self, config: QuillConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = quill_norm(config, self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = quill_norm(config, self.head_dim) if config.qk_norm else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: EncoderDecoderCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        q = self.q_norm(self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim)).transpose(1, 2)
        if cache is not None and cache.is_updated.get(self.layer_idx):
            # After the first decoding step the encoder's keys/values are in the cache: reuse them.
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            k, v = layer.keys, layer.values
        else:
            kv = self.kv_proj(encoder_hidden_states).view(*encoder_hidden_states.shape[:-1], -1, self.head_dim)
            k, v = kv.split([self.num_kv_heads, self.num_kv_heads], dim=-2)
            k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.cross_attention_cache.update(k, v, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


class QuillEncoderLayer(QuillDecoderLayer):
    """Quill's block with bidirectional self-attention (every token sees the whole source, padding masked)."""

    def __init__(self, config: QuillConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn.is_causal = False


class QuillSeq2SeqDecoderLayer(GradientCheckpointingLayer):
    """Causal self-attention, then cross-attention to the encoder states, then the MLP; each sublayer pre-norm
    (``x + f(norm(x))``) or post-norm (``norm(x + f(x))``) as ``norm_position`` says, like QuillDecoderLayer."""

    def __init__(self, config: QuillConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = QuillAttention(config, layer_idx)
        self.self_attn.is_causal = True
        self.cross_attn = QuillCrossAttention(config, layer_idx)
        self.mlp = quill_mlp(config)
        self.input_layernorm = quill_norm(config, config.hidden_size)
        self.cross_attention_layernorm = quill_norm(config, config.hidden_size)
        self.post_attention_layernorm = quill_norm(config, config.hidden_size)

    def _sublayer(self, hidden_states: torch.Tensor, norm: nn.Module, fn: Callable) -> torch.Tensor:
        if self.pre_norm:
            return hidden_states + fn(norm(hidden_states))
        return norm(hidden_states + fn(hidden_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: EncoderDecoderCache | None = None,
    ) -> torch.Tensor:
        self_cache = cache.self_attention_cache if cache is not None else None

        def self_attention(x):
            return self.self_attn(x, position_embeddings, attention_mask, cache=self_cache, position_ids=position_ids)[
                0
            ]

        def cross_attention(x):
            return self.cross_attn(x, encoder_hidden_states, encoder_attention_mask, cache=cache)[0]

        hidden_states = self._sublayer(hidden_states, self.input_layernorm, self_attention)
        hidden_states = self._sublayer(hidden_states, self.cross_attention_layernorm, cross_attention)
        return self._sublayer(hidden_states, self.post_attention_layernorm, self.mlp)


class QuillSeq2SeqPreTrainedModel(QuillPreTrainedModel):
    _no_split_modules = ["QuillEncoderLayer", "QuillSeq2SeqDecoderLayer"]
    _can_record_outputs = {}  # hidden states / attentions are not recorded for the seq2seq stacks (yet)

    def __init__(self, config: QuillConfig, *args, **kwargs):
        check_seq2seq_config(config)
        super().__init__(config, *args, **kwargs)


class QuillSeq2SeqEncoder(QuillSeq2SeqPreTrainedModel):
    def __init__(self, config: QuillConfig, embed_tokens: nn.Embedding | None = None):
        super().__init__(config)
        self.embed_tokens = embed_tokens or nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.positions = QuillPositions(config)
        self.layers = nn.ModuleList(QuillEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = final_norm(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # Positions count real tokens only, so a left-padded source is encoded exactly like the unpadded one.
        if attention_mask is not None and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        hidden_states, position_embeddings = self.positions(inputs_embeds, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings
            )
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class QuillSeq2SeqDecoder(QuillSeq2SeqPreTrainedModel):
    def __init__(self, config: QuillConfig, embed_tokens: nn.Embedding | None = None):
        super().__init__(config)
        self.embed_tokens = embed_tokens or nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.positions = QuillPositions(config)
        self.layers = nn.ModuleList(QuillSeq2SeqDecoderLayer(config, i) for i in range(config.num_decoder_layers))
        self.norm = final_norm(config)
        self.post_init()

    @deprecate_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of decoder_input_ids or decoder_inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        past_seen = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen
        self_cache = cache.self_attention_cache if cache is not None else None
        # The cache goes in by position: its keyword is `past_key_values` or `cache` depending on the release.
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, self_cache, position_ids)
        cross_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=encoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        )
        hidden_states, position_embeddings = self.positions(inputs_embeds, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                causal_mask,
                encoder_hidden_states,  # positional, for gradient checkpointing
                encoder_attention_mask=cross_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), **{CACHE_FIELD: cache if use_cache else None}
        )


class QuillSeq2SeqModel(QuillSeq2SeqPreTrainedModel):
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.encoder = QuillSeq2SeqEncoder(config, self.shared)
        self.decoder = QuillSeq2SeqDecoder(config, self.shared)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = self.encoder.embed_tokens = self.decoder.embed_tokens = value

    @deprecate_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            **{CACHE_FIELD: decoder_outputs.get(CACHE_FIELD)},
        )


class QuillForConditionalGeneration(QuillSeq2SeqPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}

    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.model = QuillSeq2SeqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        if labels is not None:
            use_cache = False  # teacher forcing over the whole target: nothing to cache
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            # Labels are aligned with the logits already (the decoder input is the shifted target): unshifted
            # token cross-entropy, summed over -100-free tokens and divided by the Trainer's count across
            # gradient-accumulation steps when it passes one.
            loss = ForMaskedLMLoss(
                logits, labels, self.config.vocab_size, num_items_in_batch=kwargs.get("num_items_in_batch")
            )
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            **{CACHE_FIELD: outputs.get(CACHE_FIELD)},
        )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """DataCollatorForSeq2Seq calls this to build decoder_input_ids in the collator."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


__all__ = ["QuillForConditionalGeneration", "QuillSeq2SeqModel", "QuillSeq2SeqPreTrainedModel", "check_seq2seq_config"]
