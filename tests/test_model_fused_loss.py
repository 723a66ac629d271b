"""The fused LM head + loss (LinearCrossEntropy) equals lm_head + transformers' ForCausalLMLoss.

Every comparison checks that the model's forward really took the fused path (a spy on the fused function it
calls, and the loss's autograd node): were `_can_fuse_loss` to say no, the model would run lm_head +
ForCausalLMLoss itself and each test would compare the stock loss with itself.
"""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from quill.model import QuillConfig, QuillForCausalLM, modeling_quill


def model_and_batch(tied=True, seed=0):
    torch.manual_seed(seed)
    config = QuillConfig(
        depth=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=701,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    model = QuillForCausalLM(config).train()
    x = torch.randint(1, 701, (3, 150))  # 450 tokens: several loss chunks plus a partial one
    labels = x.clone()
    labels[0, :40] = -100
    labels[2, 100:] = -100
    return model, x, labels


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls the model's forward makes to the fused head + loss (each call's keyword arguments)."""
    calls = []
    real = modeling_quill.fused_causal_lm_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_quill, "fused_causal_lm_loss", spy)
    return calls


def fused(model, calls, x, labels, **loss_kwargs):
    """model(x, labels=labels), which must run the fused head + loss exactly once, and its loss must come from it."""
    before = len(calls)
    out = model(x, labels=labels, **loss_kwargs)
    assert len(calls) == before + 1, "the model did not take the fused head + loss path"
    assert calls[-1] == loss_kwargs  # the loss arguments reached the fused loss
    if out.loss.requires_grad:
        assert type(out.loss.grad_fn).__name__ == "LinearCrossEntropyBackward", out.loss.grad_fn
    return out


def reference(model, x, labels, **loss_kwargs):
    """The stock path: the backbone, then lm_head and transformers' ForCausalLMLoss called here, not the fused loss."""
    hidden = model.model(x).last_hidden_state
    logits = model.lm_head(hidden)
    loss = ForCausalLMLoss(logits, labels, model.config.vocab_size, **loss_kwargs)
    if loss.requires_grad:
        assert type(loss.grad_fn).__name__ != "LinearCrossEntropyBackward"
    return loss, logits


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a, b, tol):
    assert set(a) == set(b)
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= tol * max(1.0, b[name].abs().max().item()), name


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    "loss_kwargs", [{}, {"num_items_in_batch": torch.tensor(123)}, {"num_items_in_batch": 77}, {"ignore_index": 5}]
)
def test_fused_loss_matches_transformers_fp32(tied, loss_kwargs, fused_calls):
    model, x, labels = model_and_batch(tied)
    if loss_kwargs.get("ignore_index") == 5:
        labels = torch.where(labels == -100, 5, labels)
    out = fused(model, fused_calls, x, labels, **loss_kwargs)
    ref_loss, ref_logits = reference(model, x, labels, **loss_kwargs)
    assert out.logits.shape == ref_logits.shape and out.logits.dtype == ref_logits.dtype
    assert torch.allclose(out.loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert torch.allclose(out.logits, ref_logits, atol=1e-6)
    assert_close(grads_of(model, out.loss), grads_of(model, ref_loss), 1e-6)


def test_fused_loss_with_shift_labels_and_gradient_through_logits(fused_calls):
    model, x, labels = model_and_batch()
    shift = torch.roll(labels, -1, dims=1)
    shift[:, -1] = -100
    out = fused(model, fused_calls, x, labels, shift_labels=shift)
    ref_loss, ref_logits = reference(model, x, labels, shift_labels=shift)
    assert torch.allclose(out.loss, ref_loss, atol=1e-6)
    # Logits stay differentiable: a second term on them gets its gradient too.
    both = grads_of(model, out.loss + out.logits.pow(2).mean())
    assert_close(both, grads_of(model, ref_loss + ref_logits.pow(2).mean()), 1e-6)
    logits_only = grads_of(model, fused(model, fused_calls, x, labels).logits.pow(2).mean())
    assert_close(logits_only, grads_of(model, reference(model, x, labels)[1].pow(2).mean()), 1e-6)


def test_fused_loss_bf16_autocast_frozen_head_and_no_grad(fused_calls):
    model, x, labels = model_and_batch(tied=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(model, fused_calls, x, labels)
        ref_loss, ref_logits = reference(model, x, labels)
    assert out.logits.dtype == ref_logits.dtype == torch.bfloat16
    assert torch.equal(out.logits, ref_logits)
    assert torch.allclose(out.loss, ref_loss, atol=1e-5)
    assert_close(grads_of(model, out.loss), grads_of(model, ref_loss), 2e-2)  # bf16 matmuls, fp32 accumulation
    model.lm_head.weight.requires_grad_(False)
    frozen_head = grads_of(model, fused(model, fused_calls, x, labels).loss)
    assert_close(frozen_head, grads_of(model, reference(model, x, labels)[0]), 1e-6)
    with torch.no_grad():
        no_grad = fused(model.eval(), fused_calls, x, labels).loss
        assert torch.allclose(no_grad, reference(model, x, labels)[0], atol=1e-6)


def test_custom_loss_function_and_logits_to_keep_take_the_ordinary_path(fused_calls):
    model, x, labels = model_and_batch()
    model.loss_function = lambda logits, labels, **kw: logits.float().mean() * 0 + 42.0
    assert model(x, labels=labels).loss.item() == 42.0
    assert model(x, labels=labels, logits_to_keep=torch.arange(150)).loss.item() == 42.0  # positions picked: stock
    assert fused_calls == []  # a custom loss sees the logits the fused path never hands it
    del model._loss_function
    assert torch.allclose(fused(model, fused_calls, x, labels).loss, reference(model, x, labels)[0], atol=1e-6)
    assert model(x, logits_to_keep=1).logits.shape[1] == 1
    assert len(fused_calls) == 1
