"""Quill: a small, fast decoder-only transformer for transformers 5.x.

Pre-norm blocks of RMSNorm -> attention (fused QKV, GQA, optional QK-norm, RoPE) and RMSNorm -> SwiGLU MLP
(fused gate/up), no biases. Attention goes through ``ALL_ATTENTION_FUNCTIONS`` so ``eager``, ``sdpa``,
``flex_attention`` and ``flash_attention_2`` all work; Quill's default is its own ``quill_sdpa`` backend, which
handles packed rows (several documents per row, marked by restarting ``position_ids``) by running SDPA's fused
causal kernel on each document instead of materialising an LxL block-diagonal mask. With labels, the causal-LM
head computes the logits and transformers' causal-LM loss in one fused, chunked pass (``LinearCrossEntropy``).
RoPE, RMSNorm and SwiGLU are small autograd functions with hand-written backwards (``Rotary``, ``RMSNormFunction``,
``SwiGLUFunction``): the same maths in fewer passes over memory, which is what eager training is bound by.

This file and ``configuration_quill.py`` are copied next to every saved checkpoint, so they must stay flat
siblings that import each other relatively (see transformers' remote-code loader).
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_quill import QuillConfig

PACKED_ATTENTION = "quill_sdpa"
# Packed documents up to this length share padded SDPA calls (one call per bucket of similar lengths); longer ones
# get a call each on a view of the row, with no padding and no gather. Many tiny calls cost more than a little
# padding; long documents are better off alone (measured on CPU: ~35% less attention time for mixed rows).
SHORT_DOCUMENT_LEN = 32
# SDPA calls up to this width run in fp32 on CPU when q/k/v are bf16/fp16 (see ``attend_documents``).
CPU_FP32_SDPA_MAX_LEN = 256


# ----------------------------------------------------------------------------------------------------------------
# Packed-row attention backend
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DocumentLayout:
    """Where the documents of a packed batch sit, computed once per forward and shared by every layer.

    Tokens are addressed in the flattened ``(batch * seq)`` order, where every document is a contiguous run.
    A document longer than ``SHORT_DOCUMENT_LEN`` is attended alone, on a view of its run. Short documents are
    grouped into buckets of similar length (lengths in (C/2, C]) and gathered into one right-padded
    ``(docs, C)`` SDPA call per bucket. The padding is exact: under a causal mask a real token never looks at the
    padding after it, and the padded outputs are dropped, so no gradient flows back through them. Cost therefore
    grows with the sum of squared document lengths, never the squared row length.
    """

    lengths: list[int]  # every document's length, in token order
    alone: list[int]  # documents attended one per SDPA call
    buckets: list[tuple[list[int], torch.Tensor, torch.Tensor]]  # short docs: (doc ids, gather (docs, C), keep)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, batch: int) -> "DocumentLayout | None":
        """None when every row holds exactly one document (then plain causal SDPA is already exact)."""
        pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
        # A document starts wherever the position does not continue the previous one (transformers' own rule).
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        doc_starts = starts.flatten().nonzero().squeeze(1)
        if doc_starts.numel() == batch:
            return None
        lengths = torch.diff(doc_starts, append=doc_starts.new_tensor([pos.numel()]))
        short = (lengths <= SHORT_DOCUMENT_LEN).nonzero().squeeze(1)
        bucket_of_doc = torch.ceil(torch.log2(lengths[short].float())).long()
        buckets = []
        for bucket in bucket_of_doc.unique().tolist():
            picked = short[bucket_of_doc == bucket]
            starts_b, lengths_b = doc_starts[picked], lengths[picked]
            cols = torch.arange(int(lengths_b.max()), device=pos.device)
            valid = cols[None, :] < lengths_b[:, None]
            gather = torch.where(valid, starts_b[:, None] + cols[None, :], 0)  # padding reads token 0, unused
            buckets.append((picked.tolist(), gather, valid.flatten().nonzero().squeeze(1)))
        alone = (lengths > SHORT_DOCUMENT_LEN).nonzero().squeeze(1).tolist()
        return cls(lengths=lengths.tolist(), alone=alone, buckets=buckets)


def attend_documents(module: nn.Module, q, k, v, dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal SDPA over ``(docs, width, heads, head_dim)`` inputs, returned in the same layout."""
    dtype, width = q.dtype, q.shape[1]
    # CPU's flash kernel is 2-3x slower in bf16 than in fp32 on short sequences (measured fwd+bwd on a 2-core
    # AVX512-BF16 EPYC: 64 docs x 32 tokens 14.1 vs 5.6 ms, 16 x 128 17.1 vs 9.0 ms; equal at 256, and bf16 is
    # faster from 512 on), so short low-precision calls run in fp32 (more precise too) with autocast off.
    upcast = q.device.type == "cpu" and q.element_size() < 4 and width <= CPU_FP32_SDPA_MAX_LEN
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            *(t.transpose(1, 2).float() if upcast else t.transpose(1, 2) for t in (q, k, v)),
            dropout_p=dropout if module.training else 0.0,
            scale=scaling,
            is_causal=True,
            enable_gqa=k.shape[2] != q.shape[2],
        )
    return out.transpose(1, 2).to(dtype)


def packed_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    document_layout: "DocumentLayout | None | str" = "unset",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA that keeps packed documents apart. Inputs are (batch, heads, seq, head_dim) like every backend."""
    batch, heads, q_len, head_dim = query.shape
    full_prefix = attention_mask is None and key.shape[2] == q_len and q_len > 1
    if document_layout == "unset":
        has_positions = full_prefix and position_ids is not None
        document_layout = DocumentLayout.from_position_ids(position_ids, batch) if has_positions else None
    if not full_prefix or document_layout is None:
        # Padding masks, decoding with a cache, or one document per row: stock SDPA is exact and fastest.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    layout = document_layout
    # (B, H, L, D) -> (B*L, H, D): a view for Quill's own q/k/v, which are laid out (B, L, H, D) underneath.
    q_tok, k_tok, v_tok = (t.transpose(1, 2).reshape(-1, t.shape[1], head_dim) for t in (query, key, value))
    pieces: list[torch.Tensor | None] = [None] * len(layout.lengths)
    if layout.alone:
        docs = [t.split(layout.lengths) for t in (q_tok, k_tok, v_tok)]
        for i in layout.alone:
            pieces[i] = attend_documents(module, *(d[i][None] for d in docs), dropout, scaling)[0]
    for doc_ids, gather, keep in layout.buckets:
        index = gather.flatten()
        q, k, v = (t.index_select(0, index).view(*gather.shape, *t.shape[1:]) for t in (q_tok, k_tok, v_tok))
        out = attend_documents(module, q, k, v, dropout, scaling).reshape(-1, heads, head_dim).index_select(0, keep)
        for i, piece in zip(doc_ids, out.split([layout.lengths[i] for i in doc_ids])):
            pieces[i] = piece
    return torch.cat(pieces).view(batch, q_len, heads, head_dim), None


def packed_sdpa_mask(*args, attention_mask=None, q_length=None, kv_length=None, kv_offset=0, **kwargs):
    """No mask at all for unpadded full-prefix input: the backend finds documents itself (no LxL tensor)."""
    if attention_mask is None and q_length == kv_length and isinstance(kv_offset, int) and kv_offset == 0:
        return None
    return sdpa_mask(
        *args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, kv_offset=kv_offset, **kwargs
    )


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention_forward)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_sdpa_mask)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a short hand-written backward; with ``gw = grad * weight`` and ``rstd = 1/rms(x)`` per row:
        grad_x = gw * rstd - x * rstd^3 * mean(gw * x)        grad_weight = sum_rows(grad * x * rstd)

    ``F.rms_norm``'s CPU autograd decomposes into pow/mean/rsqrt/mul, differentiates each, and for bf16 input
    accumulates the weight gradient in bf16. Here every reduction accumulates in fp32 and the elementwise passes
    stay in the input's dtype: fp32 input runs torch's fused kernel; bf16/fp16 input (QK-norm under autocast)
    computes rstd in fp32 without materialising an fp32 copy of x (the fused CPU kernel makes one, and casts back).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        w = weight.to(x.dtype)
        if x.element_size() >= 4 and hasattr(torch.ops.aten, "_fused_rms_norm"):  # the op is new in torch 2.8
            out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], w, eps)
        else:
            rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
            rstd = rstd.pow_(2).div_(x.shape[-1]).add_(eps).rsqrt_()
            out = (x * rstd.to(x.dtype)).mul_(w)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        scale = rstd.to(x.dtype)
        gw = grad * weight.to(grad.dtype)
        coef = torch.linalg.vecdot(gw, x).unsqueeze(-1).to(rstd.dtype).mul_(rstd.pow(3)).div_(-x.shape[-1])
        grad_x = torch.addcmul(gw.mul_(scale), x, coef.to(x.dtype))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x).mul_(scale).reshape(-1, x.shape[-1]).sum(0, dtype=rstd.dtype).to(weight.dtype)
        return grad_x, grad_weight, None


class QuillRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cpu":  # CUDA has fused forward and backward kernels for F.rms_norm
            return F.rms_norm(hidden_states, self.weight.shape, self.weight.to(hidden_states.dtype), self.eps)
        return RMSNormFunction.apply(hidden_states, self.weight, self.eps)

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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """RoPE, ``x * cos + rotate_half(x) * sin`` (halves convention, sign=-1 rotates back), in x's dtype.

    One multiply and two in-place multiply-adds on the halves instead of the six passes and two temporaries of
    ``rotate_half``; cos/sin are cast to x's dtype so that under autocast bf16 q/k stay bf16 (an fp32 cos would
    promote them to fp32, and SDPA would then cast them back)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out


class Rotary(torch.autograd.Function):
    """RoPE with a hand-written backward: a rotation's adjoint is the inverse rotation, so nothing but cos/sin is
    kept for backward and the gradient costs what the forward does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, sin, sign=-1.0), None, None


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k: (batch, seq, heads, head_dim), the layout the projection produces; cos, sin: (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)


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
        self.qkv_proj = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = QuillRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = QuillRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        qkv = self.qkv_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=-2)
        q, k = apply_rotary_pos_emb(self.q_norm(q), self.k_norm(k), *position_embeddings)
        query_states, key_states, value_states = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
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


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` on the fused gate/up projection, keeping only that projection for backward.

    Autograd would keep gate, silu(gate) and up, then assemble the gradient of the fused projection with a
    ``cat``; here the two halves of the gradient are written straight into one buffer (same maths, same numbers).
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        grad_up.copy_(F.silu(gate).mul_(grad))  # a strided copy is cheaper than a strided-output multiply on CPU
        return grad_gate_up


class QuillMLP(nn.Module):
    def __init__(self, config: QuillConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(SwiGLUFunction.apply(self.gate_up_proj(x)))


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
        past_key_values: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ----------------------------------------------------------------------------------------------------------------
# Causal-LM loss fused with the LM head
# ----------------------------------------------------------------------------------------------------------------

# Tokens whose fp32 logits are processed at once: 256 * vocab 8192 * 4 bytes = 8 MiB, one buffer reused by every
# chunk (a fresh allocation per chunk page-faults and cost ~3x more on CPU).
LOSS_CHUNK_TOKENS = 256


class LinearCrossEntropy(torch.autograd.Function):
    """``logits = hidden @ weight.T`` and the summed next-token cross-entropy, the softmax done a chunk at a time.

    transformers' ``ForCausalLMLoss`` upcasts all (tokens, vocab) logits to fp32 and runs log_softmax, nll_loss and
    their backward over them: several tokens*vocab*4-byte tensors allocated, page-faulted and streamed through memory
    every step; on CPU that cost more than the LM-head matmuls. Here the logits stay in the matmul dtype (they are
    what ``lm_head`` returns anyway); each chunk is upcast into one reused fp32 buffer, reduced to its loss and turned
    into its gradient ``(softmax - one_hot) / divisor`` in place, then stored in the matmul dtype. Backward is the two
    matmuls an ``nn.Linear`` would do. Same maths as transformers: matmul in the autocast dtype, softmax in fp32,
    ``ignore_index`` tokens contribute nothing, sum / divisor. Less memory too: no fp32 (tokens, vocab) tensor.

    The returned logits stay differentiable (a loss on them adds its gradient to the cross-entropy's).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, ignore_index, dtype, needs_grad):
        ctx.set_materialize_grads(False)
        h, w = hidden.to(dtype), weight.to(dtype)
        logits = h @ w.t()
        grad_logits = torch.empty_like(logits) if needs_grad else None
        work = torch.empty(min(LOSS_CHUNK_TOKENS, len(logits)), logits.shape[1], device=h.device, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, len(logits), LOSS_CHUNK_TOKENS):
            rows = slice(start, start + LOSS_CHUNK_TOKENS)
            target = labels[rows]
            valid = (target != ignore_index)[:, None]
            target = torch.where(valid, target[:, None], 0)
            chunk = work[: len(target)].copy_(logits[rows])  # fp32
            chunk.sub_(chunk.amax(dim=-1, keepdim=True))  # shifted logits: exp cannot overflow
            target_logit = chunk.gather(1, target)
            sum_exp = chunk.exp_().sum(dim=-1, keepdim=True)
            loss += torch.where(valid, sum_exp.log() - target_logit, 0).sum()  # logsumexp - target logit
            if grad_logits is not None:
                row_weight = valid / divisor
                chunk.mul_(row_weight / sum_exp).scatter_add_(1, target, -row_weight)  # (softmax - one_hot) / divisor
                grad_logits[rows] = chunk
        ctx.save_for_backward(h, w, grad_logits)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss / divisor, logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_of_logits):
        h, w, grad_logits = ctx.saved_tensors
        if grad_loss is None:
            grad_logits, scale = grad_of_logits, None
        elif grad_of_logits is not None:  # somebody also differentiated the returned logits
            grad_logits, scale = grad_logits * grad_loss + grad_of_logits, None
        else:
            scale = grad_loss  # scale the (small) results, not the (tokens, vocab) gradient
        if grad_logits is None:
            return (None,) * 7
        grad_hidden = grad_logits @ w if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ h if ctx.needs_input_grad[1] else None
        if scale is not None:
            grad_hidden = grad_hidden * scale if grad_hidden is not None else None
            grad_weight = grad_weight * scale if grad_weight is not None else None
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_hidden.to(hidden_dtype) if grad_hidden is not None else None
        grad_weight = grad_weight.to(weight_dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) with the semantics of ``lm_head`` + transformers' ``ForCausalLMLoss`` (same arguments)."""
    weight = lm_head.weight
    hidden = hidden_states.to(weight.device)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(weight.device)
    # As in fixed_cross_entropy: mean over non-ignored tokens, or sum / num_items_in_batch (gradient accumulation).
    divisor = (shift_labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(divisor):
        divisor = divisor.to(weight.device)
    device_type = weight.device.type
    autocasting = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocasting else hidden.dtype
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        loss, logits = LinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels, divisor, ignore_index, dtype, needs_grad
        )
    return loss, logits.view(*hidden.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class QuillPreTrainedModel(PreTrainedModel):
    config: QuillConfig
    config_class = QuillConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QuillDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": QuillDecoderLayer, "attentions": QuillAttention}

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        # Quill's packed-aware SDPA is the default; anything the user asks for explicitly still wins.
        return super().get_correct_attn_implementation(requested_attention or PACKED_ATTENTION, is_init_check)


class QuillModel(QuillPreTrainedModel):
    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(QuillDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = QuillRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = QuillRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen

        # transformers only looks for packed documents (restarting position_ids) when there is no cache, so an empty
        # cache created by use_cache=True would let documents attend to each other. An empty dynamic cache changes
        # nothing about the mask, so build the mask as if it were absent: packed rows stay separate either way.
        fresh_dynamic_cache = isinstance(past_key_values, DynamicCache) and past_seen == 0
        mask_cache = None if fresh_dynamic_cache and attention_mask is None else past_key_values
        if not isinstance(causal_mask := attention_mask, dict):
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=mask_cache,
                position_ids=position_ids,
            )
        else:
            causal_mask = causal_mask["full_attention"]
        if self.config._attn_implementation == PACKED_ATTENTION and causal_mask is None and past_seen == 0:
            kwargs["document_layout"] = DocumentLayout.from_position_ids(position_ids, inputs_embeds.shape[0])

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                **kwargs,
            )
        # The final norm lives in the backbone: TRL's fused LM head multiplies last_hidden_state by the
        # output embedding itself, so nothing may sit between them in the causal-LM head.
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=past_key_values if use_cache else None
        )


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
            isinstance(logits_to_keep, int) and logits_to_keep == 0
            and self.loss_function is ForCausalLMLoss
            and type(head) is nn.Linear and head.bias is None
            and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))
        )  # fmt: skip

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
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
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class QuillForSequenceClassification(QuillPreTrainedModel):
    """Backbone + a linear ``score`` head read at each row's last non-pad token (TRL's reward-model shape)."""

    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = QuillModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch = logits.shape[0]
        pad_id = self.config.pad_token_id
        if input_ids is not None and pad_id is not None:
            # Rightmost non-pad token, so left and right padding both work.
            non_pad = (input_ids != pad_id).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
        elif batch == 1 or attention_mask is None and pad_id is None:
            last = torch.full((batch,), -1, device=logits.device)
        else:
            raise ValueError("QuillForSequenceClassification needs config.pad_token_id to pool padded batches")
        pooled_logits = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "DocumentLayout",
    "LinearCrossEntropy",
    "PACKED_ATTENTION",
    "QuillForCausalLM",
    "QuillForSequenceClassification",
    "QuillModel",
    "QuillPreTrainedModel",
    "packed_sdpa_attention_forward",
]
