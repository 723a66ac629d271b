"""Quill's kernels: the packed-row attention backend and small autograd functions with hand-written backwards.

Kept apart from ``modeling_quill.py`` so the model reads like transformers' own; this file is imported relatively
by the model and copied beside every checkpoint with it, so it must stay a flat sibling with no project imports.

- ``packed_sdpa_attention_forward``: attention for packed rows (several documents per row, marked by restarting
  ``position_ids``). It runs SDPA's fused causal kernel per document instead of materialising an LxL block mask.
  Quill's ``sdpa`` implementation calls it for packed rows (``QuillModel.forward`` finds the documents); it is also
  registered under its own name, ``quill_sdpa``, for explicit use (any model can select it that way).
- ``rms_norm``, ``swiglu``: the textbook maths with backwards that keep less for backward than autograd's
  decomposition. ``bench/model_throughput.py`` measures each against its plain-autograd reference (``reference_*``
  below) in the same run; bench/README.md has the figures that keep them here.
- ``fused_causal_lm_loss``: the LM head and transformers' causal-LM loss in one chunked pass.

Every function here runs the same code on every device (tested on CPU), except where a branch says otherwise.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

PACKED_ATTENTION = "quill_sdpa"
# Packed documents up to this length share padded SDPA calls (one call per bucket of similar lengths); longer ones
# get a call each on a view of the row. Many tiny calls cost more than a little padding; long documents are better
# off alone.
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
    # CPU only: SDPA's flash kernel is slower in bf16 than in fp32 on short sequences, so short low-precision calls
    # run in fp32 (more precise too) with autocast off. bench/model_throughput.py documents the measurement.
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
    # Documents are attended causally: an encoder's (bidirectional) attention takes the stock path with its mask.
    full_prefix = attention_mask is None and key.shape[2] == q_len and q_len > 1 and getattr(module, "is_causal", True)
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
    """No mask at all for unpadded full-prefix causal input: the backend finds documents itself (no LxL tensor).
    Bidirectional masks (``create_bidirectional_mask`` passes ``allow_is_bidirectional_skip``) follow sdpa's rules:
    the per-document kernel is causal only."""
    causal = "allow_is_bidirectional_skip" not in kwargs
    if causal and attention_mask is None and q_length == kv_length and isinstance(kv_offset, int) and kv_offset == 0:
        return None
    return sdpa_mask(
        *args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, kv_offset=kv_offset, **kwargs
    )


# transformers' registries are how a backend is selected by name (`attn_implementation="quill_sdpa"`). A new name
# only: "sdpa" is not re-registered (that would change every model in the process); Quill's own `sdpa` reaches the
# packed path from inside the model instead.
AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention_forward)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_sdpa_mask)


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm, SwiGLU
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


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight.to(x.dtype), eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension. CUDA has fused forward and backward kernels for ``F.rms_norm``; CPU does not."""
    if x.device.type != "cpu":
        return reference_rms_norm(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)


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


def reference_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(gate_up)


# ----------------------------------------------------------------------------------------------------------------
# Causal-LM loss fused with the LM head
# ----------------------------------------------------------------------------------------------------------------

# Tokens whose fp32 logits are processed at once: 256 * vocab 8192 * 4 bytes = 8 MiB, one buffer reused by every
# chunk (a fresh allocation per chunk page-faults on CPU).
LOSS_CHUNK_TOKENS = 256


class LinearCrossEntropy(torch.autograd.Function):
    """``logits = hidden @ weight.T`` and the summed next-token cross-entropy, the softmax done a chunk at a time.

    transformers' ``ForCausalLMLoss`` upcasts all (tokens, vocab) logits to fp32 and runs log_softmax, nll_loss and
    their backward over them: several tokens*vocab*4-byte tensors allocated and streamed through memory every step.
    Here the logits stay in the matmul dtype (they are what ``lm_head`` returns anyway); each chunk is upcast into
    one reused fp32 buffer, reduced to its loss and turned into its gradient ``(softmax - one_hot) / divisor`` in
    place, then stored in the matmul dtype. Backward is the two matmuls an ``nn.Linear`` would do. Same maths as
    transformers: matmul in the autocast dtype, softmax in fp32, ``ignore_index`` tokens contribute nothing,
    sum / divisor. Less memory too: no fp32 (tokens, vocab) tensor.

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
