"""Quill: a small, fast transformer for transformers 5.x, as a decoder (the default) or a BERT-style encoder.

The default: pre-norm blocks of RMSNorm -> attention (fused QKV, GQA, optional QK-norm, RoPE) and RMSNorm -> SwiGLU
MLP (fused gate/up), no biases. ``QuillConfig`` switches the parts the textbook architectures differ in: the position
encoding (RoPE, sinusoidal, learned, ALiBi), post-norm ("Add & Norm") and LayerNorm, a plain GELU/ReLU MLP, and
``is_decoder=False`` for a bidirectional encoder with masked-LM, classification, token-classification and QA heads.
Attention goes through ``ALL_ATTENTION_FUNCTIONS`` so ``eager``, ``sdpa``, ``flex_attention`` and
``flash_attention_2`` all work (ALiBi: eager and sdpa only, see ``alibi_attention_mask``). The default is ``sdpa``,
as for every transformers model; in a Quill decoder it keeps packed documents apart without an LxL mask: packed
rows (restarting ``position_ids``, no attention mask, no cache yet) run SDPA once per document, everything else
takes transformers' stock sdpa path. The kernels (that packed attention, also selectable as ``quill_sdpa``;
RMSNorm/SwiGLU autograd functions and the fused LM-head loss) live in ``kernels_quill.py``.

This file, ``configuration_quill.py`` and ``kernels_quill.py`` are copied next to every saved checkpoint and run
under whatever transformers the loader has, so they stay flat siblings that import each other relatively, and use
only what exists across the transformers range Quill supports.
"""

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
)
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutputWithPast,
)
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


def quill_norm(config: QuillConfig, size: int) -> nn.Module:
    """The config's norm (``norm_type``) over ``size`` features: RMSNorm, or LayerNorm with a bias as in BERT."""
    if config.norm_type == "layernorm":
        return nn.LayerNorm(size, eps=config.rms_norm_eps)
    return QuillRMSNorm(size, config.rms_norm_eps)


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


class QuillSinusoidalEmbedding(nn.Module):
    """Vaswani et al. (2017) 3.5: ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) = cos(...)``, added to
    the token embeddings, which are scaled by ``sqrt(d)`` first (their 3.4). Computed from ``position_ids`` on the
    fly: no table, so no length limit and nothing to save. Sines and cosines are concatenated rather than
    interleaved, a fixed permutation of the features that changes nothing for the model."""

    def __init__(self, config: QuillConfig, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = config.hidden_size, base

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(0, self.dim, 2, dtype=torch.float, device=inputs_embeds.device) / self.dim
        angles = position_ids[..., None].float() * (1.0 / self.base**steps)
        table = torch.cat((angles.sin(), angles.cos()), dim=-1).to(inputs_embeds.dtype)
        return inputs_embeds * self.dim**0.5 + table


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): the geometric series 2^(-8/n), 2^(-16/n), ... for n a power of
    two, interleaved with the next power's series otherwise (as BLOOM builds them)."""
    closest = 2 ** (num_heads.bit_length() - 1)
    slopes = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    slopes += [2 ** (-4 * (2 * i + 1) / closest) for i in range(num_heads - closest)]
    return torch.tensor(slopes)


def alibi_attention_mask(
    mask: torch.Tensor | None,
    documents: torch.Tensor | None,
    num_heads: int,
    q_len: int,
    kv_len: int,
    causal: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The additive (batch|1, heads, q_len, kv_len) float mask ALiBi attends with: ``-slope * distance`` where
    attention is allowed, the dtype's minimum elsewhere. Allowed is what ``mask`` says (transformers' mask: bool for
    sdpa, 0/min floats for eager); where that is None (no padding: plain causal or bidirectional), ``documents``
    (packed rows' document ids, or None) still keeps packed documents apart. Queries are the last ``q_len`` keys.

    Distances are taken between token indices, not position ids: they differ only by a row's left padding (masked)
    or across packed documents (masked), and indices also hold for cached keys. An additive bias rules out SDPA's
    fused ``is_causal`` kernel and the packed per-document path: ALiBi always runs SDPA with this explicit mask."""
    q_idx = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    distance = q_idx - torch.arange(kv_len, device=device)[None, :]
    bias = -alibi_slopes(num_heads).to(device)[None, :, None, None] * distance.abs()
    if mask is not None:
        allowed = mask if mask.dtype == torch.bool else mask == 0
    else:
        allowed = (distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool))[None, None]
        if documents is not None:
            allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])
    return torch.where(allowed, bias.to(dtype), torch.finfo(dtype).min)


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


class QuillPlainMLP(nn.Module):
    """The original transformer / BERT / GPT-2 feed-forward: ``down(act(up(x)))``, ``act`` from ``hidden_act``."""

    def __init__(self, config: QuillConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


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
        # Post-norm blocks end in a norm already (the original transformer has no final one).
        self.norm = quill_norm(config, config.hidden_size) if config.norm_position == "pre" else nn.Identity()
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

        mask = self._attention_mask(inputs_embeds, attention_mask, cache, past_seen, position_ids, kwargs)
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

    def _attention_mask(self, inputs_embeds, attention_mask, cache, past_seen, position_ids, kwargs):
        """The mask every layer attends with (None where SDPA's own causal kernel or no mask is exact). May set
        ``kwargs["document_layout"]`` for the packed per-document path."""
        config, attn = self.config, self.config._attn_implementation
        alibi = config.position_embedding == "alibi"
        if alibi and attn not in ("eager", "sdpa", PACKED_ATTENTION):
            raise ValueError(
                f"position_embedding='alibi' needs an additive attention bias: use eager or sdpa, not {attn}"
            )
        if isinstance(attention_mask, dict):
            return attention_mask["full_attention"]
        # transformers only looks for packed documents (restarting position_ids) when there is no cache, so an empty
        # cache created by use_cache=True would let documents attend to each other. An empty dynamic cache changes
        # nothing about the mask, so build the mask as if it were absent: packed rows stay separate either way.
        fresh_dynamic_cache = isinstance(cache, DynamicCache) and past_seen == 0
        mask_cache = None if fresh_dynamic_cache and attention_mask is None else cache
        compiling = is_torchdynamo_compiling()
        if not config.is_decoder:
            # Bidirectional; packed documents kept apart by transformers' block mask (the per-document kernel below
            # is causal, and its padded buckets would be attended to by a bidirectional query).
            rows = position_ids.expand(inputs_embeds.shape[0], -1)
            packed = find_packed_sequence_indices(rows) if attention_mask is None else None
            mask = create_bidirectional_mask(
                config,
                inputs_embeds,
                attention_mask,
                and_mask_function=packed_sequence_mask_function(packed) if packed is not None else None,
            )
        else:
            # sdpa (and quill_sdpa) on unpadded full-prefix input: rows holding several documents are attended per
            # document, with no mask at all (transformers would build an LxL block mask). Under torch.compile finding
            # the documents is data-dependent control flow, so there transformers' mask keeps them apart instead.
            if attn in PACKING_AWARE and attention_mask is None and mask_cache is None and not compiling and not alibi:
                layout = DocumentLayout.from_position_ids(position_ids, inputs_embeds.shape[0])
                if layout is not None or attn == PACKED_ATTENTION:
                    kwargs["document_layout"] = layout  # None: one document per row (quill_sdpa need not look again)
                if layout is not None:
                    return None
            # The cache goes in by position: its keyword is `past_key_values` or `cache` depending on the release.
            mask = create_causal_mask(config, inputs_embeds, attention_mask, mask_cache, position_ids=position_ids)
        if alibi:
            q_len = inputs_embeds.shape[1]
            # quill_sdpa builds no mask for packed rows (its kernel finds the documents; ALiBi cannot use it).
            documents = find_packed_sequence_indices(position_ids) if mask is None and past_seen == 0 else None
            heads, kv_len, embeds = config.num_attention_heads, past_seen + q_len, inputs_embeds
            mask = alibi_attention_mask(
                mask, documents, heads, q_len, kv_len, config.is_decoder, embeds.dtype, embeds.device
            )
        return mask


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

    def pool(self, hidden_states, input_ids, attention_mask) -> torch.Tensor:
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        pad_id = self.config.pad_token_id
        if self.config.classifier_pooling == "last":
            if pad_id is None and hidden_states.shape[0] != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            if pad_id is None or input_ids is None:
                return hidden_states[:, -1]
            non_pad = (input_ids != pad_id).to(hidden_states.device, torch.int32)
            token_indices = torch.arange(input_ids.shape[-1], device=hidden_states.device, dtype=torch.int32)
            return hidden_states[rows, (token_indices * non_pad).argmax(-1)]
        if attention_mask is not None:
            keep = attention_mask.to(hidden_states.device).bool()
        elif input_ids is not None and pad_id is not None:
            keep = (input_ids != pad_id).to(hidden_states.device)
        else:
            keep = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        if self.config.classifier_pooling == "first":  # the first real token: left padding allowed
            return hidden_states[rows, keep.int().argmax(-1)]
        weights = keep.to(hidden_states.dtype)[..., None]
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)

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
        logits = self.score(self.pool(outputs.last_hidden_state, input_ids, attention_mask))
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


__all__ = [
    "PACKED_ATTENTION",
    "QuillForCausalLM",
    "QuillForMaskedLM",
    "QuillForQuestionAnswering",
    "QuillForSequenceClassification",
    "QuillForTokenClassification",
    "QuillModel",
    "QuillPreTrainedModel",
]
