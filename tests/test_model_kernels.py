"""Quill's hand-written autograd functions (RoPE, RMSNorm, SwiGLU) against plain-autograd references.

float64 gradcheck proves each backward is the derivative of its forward; the fp32/bf16 comparisons prove the forward
is the textbook formula the rest of transformers uses (rotate_half RoPE, RMSNorm, SiLU-gated MLP)."""

import pytest
import torch
import torch.nn.functional as F

from custom_models.quill.modeling_quill import RMSNormFunction, Rotary, SwiGLUFunction, rotate


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g, dtype=dtype)  # (batch, seq, heads, head_dim)
    angles = torch.randn(2, 5, 1, 4, generator=g, dtype=dtype)
    emb = torch.cat([angles, angles], dim=-1)
    return x, emb.cos(), emb.sin()


def test_rope_matches_rotate_half_formula_and_inverts():
    x, cos, sin = rope_inputs(torch.float32)
    expected = x * cos + rotate_half(x) * sin
    out = rotate(x, cos, sin)
    assert (out - expected).abs().max() < 1e-6
    assert (rotate(out, cos, sin, sign=-1.0) - x).abs().max() < 1e-5  # the inverse rotation undoes it


def test_rope_gradcheck():
    x, cos, sin = rope_inputs()
    assert torch.autograd.gradcheck(lambda t: Rotary.apply(t, cos, sin), (x.requires_grad_(),))


def test_rope_keeps_bf16_inputs_bf16():
    x, cos, sin = rope_inputs(torch.float32)
    assert rotate(x.bfloat16(), cos, sin).dtype == torch.bfloat16  # fp32 cos must not promote q/k to fp32


def test_rms_norm_gradcheck_and_matches_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))
    grad = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6), (x, w), grad)
    ref = torch.autograd.grad(F.rms_norm(x, (16,), w, 1e-6), (x, w), grad)
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(ours, ref))


def test_rms_norm_bf16_weight_gradient_is_accumulated_in_fp32():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 64, generator=g).bfloat16().requires_grad_()
    w = torch.ones(64, requires_grad=True)  # fp32 parameter, bf16 activations: autocast's situation
    grad = torch.randn(4096, 64, generator=g).bfloat16()
    (grad_w,) = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6), (w,), grad)
    exact = (grad.double() * F.rms_norm(x.double(), (64,), None, 1e-6)).sum(0)
    assert grad_w.dtype == torch.float32
    # Summing 4096 bf16 products in bf16 is off by ~1e-1 here; fp32 accumulation leaves only the inputs' rounding.
    assert (grad_w.double() - exact).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_autograd_reference(dtype):
    g = torch.Generator().manual_seed(3)
    gate_up = torch.randn(2, 7, 12, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(2, 7, 6, generator=g).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    ref_out = F.silu(gate) * up
    (ref_grad,) = torch.autograd.grad(ref_out, gate_up, grad)
    out = SwiGLUFunction.apply(gate_up)
    (grad_ours,) = torch.autograd.grad(out, gate_up, grad)
    assert torch.equal(out, ref_out) and torch.equal(grad_ours, ref_grad)


def test_swiglu_gradcheck():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (x,))
