"""Quill: a small, fast decoder-only transformer for transformers 5.x.

Pre-norm blocks of RMSNorm -> attention (fused QKV, GQA, optional QK-norm, RoPE) and RMSNorm -> SwiGLU MLP
(fused gate/up), no biases. Attention goes through ``ALL_ATTENTION_FUNCTIONS`` so ``eager``, ``sdpa``,
``flex_attention`` and ``flash_attention_2`` all work. The default is ``sdpa``, as for every transformers model; in
Quill it keeps packed documents apart without an LxL mask: packed rows (restarting ``position_ids``, no attention
mask, no cache yet) run SDPA once per document, everything else takes transformers' stock sdpa path. The kernels
(that packed attention, also selectable as ``quill_sdpa``; RMSNorm/SwiGLU autograd functions and the fused LM-head
loss) live in ``kernels_quill.py``.

This file, ``configuration_quill.py`` and ``kernels_quill.py`` are copied next to every saved checkpoint and run
under whatever transformers the loader has, so they stay flat siblings that import each other relatively, and use
only what exists across the transformers range Quill supports.
"""

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_quill import QuillConfig
from .kernels_quill import (
    PACKED_ATTENTION,
    DocumentLayout,
    fused_causal_lm_loss,
    packed_sdpa_attention_forward,
    rms_norm,
    swiglu,
)

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache` (generate() passes
# `cache=`, earlier releases `past_key_values=`). Quill's forwards take both names and use `cache` inside; outputs
# are built with the field name of the installed release, so `outputs.cache` / `outputs.past_key_values` both work.
CACHE_FIELD = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
# Attention implementations whose packed rows Quill attends per document (see QuillModel.forward).
PACKING_AWARE = ("sdpa", PACKED_ATTENTION)


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


class QuillRotaryEmbedding(nn.Module):
    def __init__(self, config: QuillConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: QuillConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE, ``x * cos + rotate_half(x) * sin``. q, k: (batch, seq, heads, head_dim), the layout the projection
    produces; cos, sin: (batch, seq, head_dim). cos/sin are cast to q's dtype so that under autocast bf16 q/k stay
    bf16 (an fp32 cos would promote them to fp32, and SDPA would then cast them back)."""
    cos, sin = cos.unsqueeze(2).to(q.dtype), sin.unsqueeze(2).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


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
        self.is_causal = True
        # One matmul for q, k and v: fewer, larger kernels (the split below is a free view).
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = QuillRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = QuillRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        qkv = self.qkv_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=-2)
        q, k = apply_rotary_pos_emb(self.q_norm(q), self.k_norm(k), *position_embeddings)
        query_states, key_states, value_states = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

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
    def __init__(self, config: QuillConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class QuillDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: QuillConfig, layer_idx: int):
        super().__init__()
        self.self_attn = QuillAttention(config, layer_idx)
        self.mlp = QuillMLP(config)
        self.input_layernorm = QuillRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = QuillRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
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
        self.layers = nn.ModuleList(QuillDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = QuillRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = QuillRotaryEmbedding(config)
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
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen

        # transformers only looks for packed documents (restarting position_ids) when there is no cache, so an empty
        # cache created by use_cache=True would let documents attend to each other. An empty dynamic cache changes
        # nothing about the mask, so build the mask as if it were absent: packed rows stay separate either way.
        fresh_dynamic_cache = isinstance(cache, DynamicCache) and past_seen == 0
        mask_cache = None if fresh_dynamic_cache and attention_mask is None else cache
        # sdpa (and quill_sdpa) on unpadded full-prefix input: rows holding several documents are attended per
        # document, with no mask at all (transformers would build an LxL block mask). Under torch.compile finding
        # the documents is data-dependent control flow, so there transformers' mask keeps them apart instead.
        layout = None
        if (
            self.config._attn_implementation in PACKING_AWARE
            and attention_mask is None
            and mask_cache is None
            and not is_torchdynamo_compiling()
        ):
            layout = DocumentLayout.from_position_ids(position_ids, inputs_embeds.shape[0])
            if layout is not None or self.config._attn_implementation == PACKED_ATTENTION:
                kwargs["document_layout"] = layout  # None: one document per row (quill_sdpa need not look again)
        if layout is not None:
            causal_mask = None
        elif isinstance(attention_mask, dict):
            causal_mask = attention_mask["full_attention"]
        else:  # the cache goes in by position: its keyword is `past_key_values` or `cache` depending on the release
            causal_mask = create_causal_mask(
                self.config, inputs_embeds, attention_mask, mask_cache, position_ids=position_ids
            )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
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


class QuillForSequenceClassification(GenericForSequenceClassification, QuillPreTrainedModel):
    """Backbone + a linear ``score`` head read at each row's last non-pad token (TRL's reward-model shape).

    transformers' generic forward; the backbone is built here directly, because the generic ``__init__`` goes
    through ``AutoModel``, which under remote-code loading would resolve the model a second time."""

    def __init__(self, config: QuillConfig):
        QuillPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = QuillModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


__all__ = [
    "PACKED_ATTENTION",
    "QuillForCausalLM",
    "QuillForSequenceClassification",
    "QuillModel",
    "QuillPreTrainedModel",
]
