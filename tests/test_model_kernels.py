"""Quill's hand-written autograd functions (RMSNorm, SwiGLU) against plain-autograd references.

float64 gradcheck proves each backward is the derivative of its forward; the fp32/bf16 comparisons prove the forward
is the textbook formula the rest of transformers uses (RMSNorm, SiLU-gated MLP)."""

import pytest
import torch
import torch.nn.functional as F

from quill.model.kernels_quill import RMSNormFunction, SwiGLUFunction


def test_rms_norm_gradcheck_and_matches_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))
    grad = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6), (x, w), grad)
    ref = torch.autograd.grad(F.rms_norm(x, (16,), w, 1e-6), (x, w), grad)
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(ours, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_autocast_case_fp32_weight_low_precision_activations(dtype):
    """Autocast's situation for QK-norm: an fp32 weight, activations in the matmul dtype. The gradients come back in
    each input's own dtype and are as accurate as that dtype allows (bf16: ~2^-8 relative)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 64, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(64, generator=g)).requires_grad_()
    grad = torch.randn(4096, 64, generator=g).to(dtype)
    out = RMSNormFunction.apply(x, w, 1e-6)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), grad)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact_out = F.rms_norm(xd, (64,), wd, 1e-6)
    exact_x, exact_w = torch.autograd.grad(exact_out, (xd, wd), grad.double())
    assert (out.dtype, grad_x.dtype, grad_w.dtype) == (dtype, dtype, torch.float32)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for ours, exact in ((out, exact_out), (grad_x, exact_x), (grad_w, exact_w)):
        assert (ours.double() - exact).abs().max() / exact.abs().max() < tol


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
