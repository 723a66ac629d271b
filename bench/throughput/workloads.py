"""What the benchmark trains: model sizes, the compared models, Quill's kernel variants, batches and FLOP counts.

Quill and transformers' LlamaForCausalLM get the same dimensions: hidden/intermediate size, layers, heads, kv heads,
vocab, tied embeddings, no biases. What differs is the implementation (fused projections, the fused LM head + loss,
RMSNorm/SwiGLU autograd functions, per-document SDPA on packed rows), plus Quill's QK-norm (on by default
and kept on here: it is extra work for Quill).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from quill.model import QuillConfig, QuillForCausalLM, kernels_quill, modeling_quill


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int
    seq: int
    batch: int
    vocab: int = 8192
    kv_heads: int | None = None
    docs_per_row: int = 1  # > 1: packed rows of that many documents, restarting position_ids

    @property
    def intermediate(self) -> int:  # Quill's default rule (SwiGLU ~ 8/3 * width, multiple of 64), given to both
        return int(-(-8 * self.hidden / 3 // 64) * 64)

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.batch


# The dimensions are those of earlier runs; batches hold 1024 tokens (4096 for the long packed rows) so that a full
# run fits in well under an hour on the shared 2-core CPU machine the benchmark is developed on (fp32 there).
SMALL = Size("d256-L4", hidden=256, layers=4, heads=4, seq=256, batch=4)
LARGE = Size("d512-L8", hidden=512, layers=8, heads=8, seq=512, batch=2)
DENSE_SIZES = (SMALL, LARGE)
# Packed rows of TRL's default SFT max_length (1024) with 8 documents each, on the small model.
PACKED = Size("d256-L4-packed", hidden=256, layers=4, heads=4, seq=1024, batch=1, docs_per_row=8)
# Packed rows as GPU pretraining runs them: 4096 tokens of ~32 documents, where attending per document saves most.
PACKED_4096 = Size("d256-L4-packed4096", hidden=256, layers=4, heads=4, seq=4096, batch=1, docs_per_row=32)
GPU_124M = Size("124M", hidden=768, layers=12, heads=12, seq=1024, batch=8, vocab=50304)

# --quick: a smoke run of every code path in seconds; its numbers mean nothing.
TINY = Size("d64-L2", hidden=64, layers=2, heads=2, seq=64, batch=2, vocab=512)
TINY_PACKED = Size("d64-L2-packed", hidden=64, layers=2, heads=2, seq=256, batch=1, vocab=512, docs_per_row=8)
TINY_PACKED_LONG = Size(
    "d64-L2-packed1024", hidden=64, layers=2, heads=2, seq=1024, batch=1, vocab=512, docs_per_row=32
)


# ----------------------------------------------------------------------------------------------------------------
# Quill's kernels and their plain-autograd references
# ----------------------------------------------------------------------------------------------------------------

# Each hand-written kernel, as the module-level names of modeling_quill that call it and the plain-autograd function
# that replaces each of them in a "quill_plain_<kernel>" model. The fused LM-head loss has no name to replace: its
# reference is the model's own unfused path (lm_head, then transformers' ForCausalLMLoss), taken when
# ``_can_fuse_loss`` says no (see ``build_models``).
KERNEL_REFERENCES: dict[str, dict[str, Callable]] = {
    "rms_norm": {"rms_norm": kernels_quill.reference_rms_norm},
    "swiglu": {"swiglu": kernels_quill.reference_swiglu},
    "fused_loss": {},
}
KERNELS = tuple(KERNEL_REFERENCES)
PLAIN_ALL = "quill_plain_all"  # every kernel above replaced at once


def plain_variant(kernel: str) -> str:
    return f"quill_plain_{kernel}"


PLAIN_VARIANTS = tuple(plain_variant(k) for k in KERNELS) + (PLAIN_ALL,)


def plain_kernels_of(name: str) -> tuple[str, ...]:
    """The kernels a model name runs with their references: () for everything but the quill_plain_* models."""
    if name.removesuffix("_compiled") == PLAIN_ALL:
        return KERNELS
    for kernel in KERNELS:
        if name.removesuffix("_compiled") == plain_variant(kernel):
            return (kernel,)
    return ()


@contextlib.contextmanager
def plain_kernels(kernels: tuple[str, ...]) -> Iterator[None]:
    """Point modeling_quill's kernel names at their references while the block runs (this process only)."""
    saved = {}
    try:
        for kernel in kernels:
            for attribute, reference in KERNEL_REFERENCES[kernel].items():
                saved[attribute] = getattr(modeling_quill, attribute)
                setattr(modeling_quill, attribute, reference)
        yield
    finally:
        for attribute, original in saved.items():
            setattr(modeling_quill, attribute, original)


def step_context(name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """What a model's training step runs inside: its kernel references, if it is a quill_plain_* model."""
    kernels = plain_kernels_of(name)
    return (lambda: plain_kernels(kernels)) if kernels else contextlib.nullcontext


# ----------------------------------------------------------------------------------------------------------------
# Reference attention: none at all
# ----------------------------------------------------------------------------------------------------------------

# "quill_no_attention" is Quill with its attention kernel replaced by a near no-op. No attention kernel can beat it,
# so its throughput is the ceiling for Quill's ratio and FLOP/s at that size.
NO_ATTENTION = "bench_no_attention"


def no_attention(module, query, key, value, attention_mask, **kwargs):
    """Returns V, with Q and K kept in the graph (added times zero) so their projections, QK-norm and RoPE still run
    forward and backward: everything of a training step except the attention kernel itself."""
    repeat = query.shape[1] // value.shape[1]
    value = value.repeat_interleave(repeat, dim=1) if repeat > 1 else value
    key = key.repeat_interleave(repeat, dim=1) if repeat > 1 else key
    return torch.add(value, query + key, alpha=0.0).transpose(1, 2), None


AttentionInterface.register(NO_ATTENTION, no_attention)
AttentionMaskInterface.register(NO_ATTENTION, lambda *args, **kwargs: None)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def model_config_kwargs(size: Size) -> dict:
    return {
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads or size.heads,
        "vocab_size": size.vocab,
        "max_position_embeddings": max(2048, size.seq),
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }


def build_model(name: str, size: Size) -> torch.nn.Module:
    """One model by name:
    - "quill": default backend sdpa (per document on packed rows), QK-norm on (the default), every kernel;
    - "llama": LlamaForCausalLM on sdpa;
    - "quill_eager", "llama_eager": the same on eager attention;
    - "quill_no_attention": the ceiling above;
    - "quill_plain_<kernel>", "quill_plain_all": Quill whose step runs the kernel's reference (``step_context``)."""
    common = model_config_kwargs(size)
    torch.manual_seed(0)
    if name.startswith("llama"):
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
        model.set_attn_implementation("eager" if name == "llama_eager" else "sdpa")
        return model
    model = QuillForCausalLM(QuillConfig(**common))
    if name == "quill_eager":
        model.set_attn_implementation("eager")
    elif name == "quill_no_attention":
        model.set_attn_implementation(NO_ATTENTION)
    elif name != "quill" and not plain_kernels_of(name):
        raise ValueError(f"unknown model {name!r}")
    if "fused_loss" in plain_kernels_of(name):
        model._can_fuse_loss = lambda logits_to_keep: False  # lm_head + ForCausalLMLoss, the reference
    return model


def build_models(names: tuple[str, ...], size: Size, device: str) -> dict[str, torch.nn.Module]:
    models = {name: build_model(name, size) for name in names}
    for name, model in models.items():  # the FLOP count below holds for every model
        linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert linears == matmul_params(size), (name, linears, matmul_params(size))
    return {name: model.to(device).train() for name, model in models.items()}


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def dense_batch(size: Size, device: str) -> dict:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def document_lengths(row_len: int, docs: int, generator: torch.Generator, min_len: int = 16) -> list[int]:
    """`docs` lengths >= min_len summing to row_len, from random cut points (mixed short and long documents)."""
    free = row_len - docs * min_len
    cuts = sorted(torch.randint(0, free + 1, (docs - 1,), generator=generator).tolist())
    return [b - a + min_len for a, b in zip([0, *cuts], [*cuts, free])]


def packed_batch(size: Size, device: str) -> tuple[dict, list[list[int]]]:
    g = torch.Generator().manual_seed(4321)
    rows = [document_lengths(size.seq, size.docs_per_row, g) for _ in range(size.batch)]
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])
    # No attention_mask and no cache: the only way transformers builds Llama's block-diagonal mask.
    batch = {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": ids.to(device), "use_cache": False}
    return batch, rows


def batch_for(size: Size, device: str) -> tuple[dict, list[list[int]] | None]:
    """(batch, document lengths per row or None for dense rows)."""
    return packed_batch(size, device) if size.docs_per_row > 1 else (dense_batch(size, device), None)


def packed_isolation(models: dict[str, torch.nn.Module], batch: dict, rows: list[list[int]]) -> dict[str, float]:
    """Max |logit difference| between the first documents of a packed row and the same documents run alone (fp32,
    no grad), per model. Raises when a model lets documents see each other: the packed comparison must be like for
    like."""
    ids = batch["input_ids"][:1]
    out = {}
    for name, model in models.items():
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=batch["position_ids"][:1], use_cache=False).logits[0]
            start, worst = 0, 0.0
            for n in rows[0][:3]:
                alone = model(input_ids=ids[:, start : start + n], use_cache=False).logits[0]
                worst = max(worst, (packed[start : start + n] - alone).abs().max().item())
                start += n
        out[name] = worst
        if worst > 1e-3:
            raise RuntimeError(f"{name}: packed documents leak into each other (max |delta logits| {worst:.3g})")
    return out


# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------


def matmul_params(size: Size) -> int:
    """Weights that take part in matmuls: every Linear in the blocks plus the (tied, counted once) LM head."""
    kv = size.kv_heads or size.heads
    head_dim = size.hidden // size.heads
    attn = size.hidden * (size.heads + 2 * kv) * head_dim + size.heads * head_dim * size.hidden
    mlp = 3 * size.hidden * size.intermediate
    return size.layers * (attn + mlp) + size.vocab * size.hidden


def attended_context(size: Size, rows: list[list[int]] | None) -> float:
    """T in the FLOP formula: the row length for dense rows (the causal half is not subtracted, as in PaLM), and
    sum(len_i^2) / row_len for packed rows (each document its own sequence: the work that is actually needed)."""
    if rows is None:
        return float(size.seq)
    return sum(n * n for lengths in rows for n in lengths) / (size.seq * len(rows))


def flops_per_token(size: Size, context: float) -> float:
    """Model FLOPs per token, forward + backward (PaLM appendix B / nanochat): 6 * N + 12 * L * H * Q * T."""
    head_dim = size.hidden // size.heads
    return 6 * matmul_params(size) + 12 * size.layers * size.heads * head_dim * context
