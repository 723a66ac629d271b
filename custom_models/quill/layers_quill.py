"""Quill's plain-PyTorch building blocks: the position encodings (RoPE, sinusoidal, ALiBi's bias), the attention
mask every layer shares, eager attention, the plain (non-gated) MLP and sequence pooling.

``modeling_quill.py`` imports these and keeps the blocks that call the kernels in ``kernels_quill.py`` (RMSNorm,
SwiGLU, the packed-row attention path), whose names ``bench/`` swaps for references. Like them, this file is copied
beside every checkpoint, so it imports its siblings relatively and nothing from the ``quill`` package.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, is_torchdynamo_compiling

from .configuration_quill import QuillConfig
from .kernels_quill import PACKED_ATTENTION, DocumentLayout

# Attention implementations whose packed rows Quill attends per document (see build_attention_mask).
PACKING_AWARE = ("sdpa", PACKED_ATTENTION)


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


class QuillPlainMLP(nn.Module):
    """The original transformer / BERT / GPT-2 feed-forward: ``down(act(up(x)))``, ``act`` from ``hidden_act``."""

    def __init__(self, config: QuillConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


def build_attention_mask(config, inputs_embeds, attention_mask, cache, past_seen: int, position_ids, kwargs: dict):
    """The mask every layer attends with (None where SDPA's own causal kernel or no mask is exact). May set
    ``kwargs["document_layout"]`` for the packed per-document path."""
    attn = config._attn_implementation
    alibi = config.position_embedding == "alibi"
    if alibi and attn not in ("eager", "sdpa", PACKED_ATTENTION):
        raise ValueError(f"position_embedding='alibi' needs an additive attention bias: use eager or sdpa, not {attn}")
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


def pool_sequence(config, hidden_states, input_ids, attention_mask) -> torch.Tensor:
    """One vector per row, as ``config.classifier_pooling`` says (see QuillForSequenceClassification)."""
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    pad_id = config.pad_token_id
    if config.classifier_pooling == "last":
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
    if config.classifier_pooling == "first":  # the first real token: left padding allowed
        return hidden_states[rows, keep.int().argmax(-1)]
    weights = keep.to(hidden_states.dtype)[..., None]
    return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)


__all__ = [
    "QuillPlainMLP",
    "QuillRotaryEmbedding",
    "QuillSinusoidalEmbedding",
    "alibi_attention_mask",
    "alibi_slopes",
    "apply_rotary_pos_emb",
    "build_attention_mask",
    "eager_attention_forward",
    "pool_sequence",
    "repeat_kv",
]
