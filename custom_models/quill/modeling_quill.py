"""Quill: a small, fast transformer for transformers 5.x, as a decoder (the default) or a BERT-style encoder.

The default: pre-norm blocks of RMSNorm -> attention (fused QKV, GQA, optional QK-norm, RoPE) and RMSNorm -> SwiGLU
MLP (fused gate/up), no biases. ``QuillConfig`` switches the parts the textbook architectures differ in: the position
encoding (RoPE, sinusoidal, learned, ALiBi), post-norm ("Add & Norm") and LayerNorm, a plain GELU/ReLU MLP, and
``is_decoder=False`` for a bidirectional encoder. Attention goes through ``ALL_ATTENTION_FUNCTIONS`` (``eager``,
``sdpa``, ``flex_attention``, ``flash_attention_2``; ALiBi: eager and sdpa only). The default is ``sdpa``; in a
decoder it keeps packed documents apart without an LxL mask: packed rows (restarting ``position_ids``, no attention
mask, no cache yet) run SDPA once per document, everything else takes transformers' stock sdpa path.

Files, all copied beside every checkpoint as flat siblings importing each other relatively (and using only what
exists across the transformers range Quill supports): this one (the blocks that call the kernels, the backbone, the
causal-LM and sequence-classification heads), ``layers_quill.py`` (position encodings, the attention mask, plain
blocks), ``kernels_quill.py`` (packed attention, also selectable as ``quill_sdpa``; RMSNorm/SwiGLU autograd
functions; the fused LM-head loss), ``modeling_quill_encoder.py`` (masked-LM, token-classification and QA heads).
"""

import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_quill import QuillConfig
from .kernels_quill import PACKED_ATTENTION, fused_causal_lm_loss, packed_sdpa_attention_forward, rms_norm, swiglu
from .layers_quill import (
    QuillPlainMLP,
    QuillRotaryEmbedding,
    QuillSinusoidalEmbedding,
    apply_rotary_pos_emb,
    build_attention_mask,
    eager_attention_forward,
    pool_sequence,
)

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache` (generate() passes
# `cache=`, earlier releases `past_key_values=`). Quill's forwards take both names and use `cache` inside; outputs
# are built with the field name of the installed release, so `outputs.cache` / `outputs.past_key_values` both work.
CACHE_FIELD = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def deprecate_past_key_values(forward: Callable) -> Callable:
    """Where `cache` is the name (5.24+), `past_key_values=` still works but warns once per call, through the same
    decorator and arguments as Llama's forwards. Before 5.24 it is the name generate() passes: accepted silently."""
    if CACHE_FIELD == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)
    return forward


class QuillRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def quill_norm(config: QuillConfig, size: int) -> nn.Module:
    """The config's norm (``norm_type``) over ``size`` features: RMSNorm, or LayerNorm with a bias as in BERT."""
    if config.norm_type == "layernorm":
        return nn.LayerNorm(size, eps=config.rms_norm_eps)
    return QuillRMSNorm(size, config.rms_norm_eps)


def final_norm(config: QuillConfig) -> nn.Module:
    # Post-norm blocks end in a norm already (the original transformer has no final one).
    return quill_norm(config, config.hidden_size) if config.norm_position == "pre" else nn.Identity()


class QuillAttention(nn.Module):
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
        self.is_causal = config.is_decoder  # read by the sdpa/flash backends when no mask is given
        # One matmul for q, k and v: fewer, larger kernels (the split below is a free view).
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = quill_norm(config, self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = quill_norm(config, self.head_dim) if config.qk_norm else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        qkv = self.qkv_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=-2)
        q, k = self.q_norm(q), self.k_norm(k)
        if position_embeddings is not None:  # RoPE; the other position encodings act outside attention
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        query_states, key_states, value_states = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if attention_mask is not None and attention_mask.is_floating_point() and attention_mask.dtype != q.dtype:
            # Under autocast SDPA wants a float mask in q's dtype. Clamped first: fp32's minimum rounds to -inf in
            # bf16, and a fully masked (padding) row of -inf would turn the softmax into NaN.
            attention_mask = attention_mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if kwargs.get("document_layout") is not None:
            # A packed row under sdpa: QuillModel.forward found its documents and built no mask. Attend per document.
            attention_interface = packed_sdpa_attention_forward
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class QuillMLP(nn.Module):
    """SwiGLU (``hidden_act="silu"``): ``down(silu(gate) * up)`` on one fused gate/up projection."""

    def __init__(self, config: QuillConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))


def quill_mlp(config: QuillConfig) -> nn.Module:
    """The MLP ``hidden_act`` names (the config has refused any other activation)."""
    return QuillMLP(config) if config.hidden_act == "silu" else QuillPlainMLP(config)


class QuillDecoderLayer(GradientCheckpointingLayer):
    """One block, encoder or decoder (the attention's mask makes the difference). Pre-norm:
    ``x + attn(norm(x))``, then ``x + mlp(norm(x))``. Post-norm, the original Add & Norm: ``norm(x + attn(x))``, then
    ``norm(x + mlp(x))``; the same two norm modules, applied after each residual add instead of before."""

    def __init__(self, config: QuillConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = QuillAttention(config, layer_idx)
        self.mlp = quill_mlp(config)
        self.input_layernorm = quill_norm(config, config.hidden_size)
        self.post_attention_layernorm = quill_norm(config, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_input = self.input_layernorm(hidden_states) if self.pre_norm else hidden_states
        attn_out, _ = self.self_attn(
            attn_input,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        if not self.pre_norm:
            hidden_states = self.input_layernorm(hidden_states + attn_out)
            return self.post_attention_layernorm(hidden_states + self.mlp(hidden_states))
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class QuillPreTrainedModel(PreTrainedModel):
    config: QuillConfig
    config_class = QuillConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QuillDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": QuillDecoderLayer, "attentions": QuillAttention}


class QuillModel(QuillPreTrainedModel):
    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        # One position encoding: rotary inside attention, an absolute one added to the embeddings here, or ALiBi's
        # bias in the attention mask (built in forward).
        position = config.position_embedding
        self.rotary_emb = QuillRotaryEmbedding(config) if position == "rope" else None
        if position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        elif position == "sinusoidal":
            self.embed_positions = QuillSinusoidalEmbedding(config)
        self.layers = nn.ModuleList(QuillDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = final_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if not self.config.is_decoder and (use_cache or cache is not None):
            raise ValueError("An encoder (is_decoder=False) attends to the whole input at once and has no KV cache")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None and not self.config.is_decoder and torch.is_tensor(attention_mask):
            # An encoder counts positions from its first real token, so left padding moves no absolute position.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen

        hidden_states = inputs_embeds
        position_embeddings = None
        if self.config.position_embedding == "rope":
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        elif self.config.position_embedding == "learned":
            if not is_torchdynamo_compiling() and position_ids.max() >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {int(position_ids.max())} is past the learned table's max_position_embeddings "
                    f"({self.config.max_position_embeddings})"
                )
            hidden_states = hidden_states + self.embed_positions(position_ids)
        elif self.config.position_embedding == "sinusoidal":
            hidden_states = self.embed_positions(hidden_states, position_ids)

        mask = build_attention_mask(self.config, inputs_embeds, attention_mask, cache, past_seen, position_ids, kwargs)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )
        # The final norm lives in the backbone: TRL's fused LM head multiplies last_hidden_state by the
        # output embedding itself, so nothing may sit between them in the causal-LM head.
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache if use_cache else None})


class QuillForCausalLM(QuillPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QuillConfig):
        if not config.is_decoder:
            raise ValueError(
                "QuillForCausalLM needs a decoder config (is_decoder=True); this one is an encoder, whose language-"
                "model head is QuillForMaskedLM"
            )
        super().__init__(config)
        self.model = QuillModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _can_fuse_loss(self, logits_to_keep) -> bool:
        """The fused head + loss computes exactly ``lm_head`` + ``ForCausalLMLoss``; use it only when those are what
        would run: the default loss, all positions kept, a plain Linear head without hooks (PEFT wrappers,
        accelerate offload hooks and custom losses take the ordinary path)."""
        head = self.lm_head
        return (
            isinstance(logits_to_keep, int)
            and logits_to_keep == 0
            and self.loss_function is ForCausalLMLoss
            and type(head) is nn.Linear
            and head.bias is None
            and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))
        )

    @deprecate_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = None
        if labels is not None and self._can_fuse_loss(logits_to_keep):
            loss, logits = fused_causal_lm_loss(hidden_states, self.lm_head, labels, **kwargs)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: outputs.get(CACHE_FIELD)},
        )


class QuillForSequenceClassification(QuillPreTrainedModel):
    """Backbone + a linear ``score`` head on one vector per row, pooled as ``config.classifier_pooling`` says: the
    last non-pad token (a decoder's default, TRL's reward-model shape, transformers' generic rule: the rightmost token
    that is not ``pad_token_id``), the first token (an encoder's default: BERT's [CLS], Quill's BOS) or the mean over
    non-pad tokens. Padding is read from ``attention_mask`` when given, otherwise from ``pad_token_id``.

    The backbone is built here directly: transformers' generic heads build it through ``AutoModel``, which under
    remote-code loading would resolve the model a second time."""

    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = QuillModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @deprecate_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(pool_sequence(self.config, outputs.last_hidden_state, input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: outputs.get(CACHE_FIELD)},
        )


def encoder_heads() -> tuple[type, ...]:
    """The encoder-only heads (masked LM, token classification, QA) of ``modeling_quill_encoder.py``, which imports
    this file. Imported here, lazily, because transformers copies a model file's relative imports beside each
    checkpoint: an encoder saved from a class of this file still loads as any head its auto_map lists."""
    from .modeling_quill_encoder import QuillForMaskedLM, QuillForQuestionAnswering, QuillForTokenClassification

    return QuillForMaskedLM, QuillForTokenClassification, QuillForQuestionAnswering


__all__ = [
    "CACHE_FIELD",
    "PACKED_ATTENTION",
    "QuillAttention",
    "QuillDecoderLayer",
    "QuillForCausalLM",
    "QuillForSequenceClassification",
    "QuillMLP",
    "QuillModel",
    "QuillPreTrainedModel",
    "QuillRMSNorm",
    "QuillRotaryEmbedding",
    "QuillSinusoidalEmbedding",
    "deprecate_past_key_values",
    "eager_attention_forward",
    "quill_mlp",
    "quill_norm",
]
