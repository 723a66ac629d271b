"""The fused LM head + loss (LinearCrossEntropy) equals lm_head + transformers' ForCausalLMLoss."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from quill.model import QuillConfig, QuillForCausalLM


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


def reference(model, x, labels, extra_logit_loss=False, **loss_kwargs):
    hidden = model.model(x).last_hidden_state
    logits = model.lm_head(hidden)
    loss = ForCausalLMLoss(logits, labels, model.config.vocab_size, **loss_kwargs)
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
def test_fused_loss_matches_transformers_fp32(tied, loss_kwargs):
    model, x, labels = model_and_batch(tied)
    if loss_kwargs.get("ignore_index") == 5:
        labels = torch.where(labels == -100, 5, labels)
    out = model(x, labels=labels, **loss_kwargs)
    ref_loss, ref_logits = reference(model, x, labels, **loss_kwargs)
    assert out.logits.shape == ref_logits.shape and out.logits.dtype == ref_logits.dtype
    assert torch.allclose(out.loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert torch.allclose(out.logits, ref_logits, atol=1e-6)
    assert_close(grads_of(model, out.loss), grads_of(model, ref_loss), 1e-6)


def test_fused_loss_with_shift_labels_and_gradient_through_logits():
    model, x, labels = model_and_batch()
    shift = torch.roll(labels, -1, dims=1)
    shift[:, -1] = -100
    out = model(x, labels=labels, shift_labels=shift)
    ref_loss, ref_logits = reference(model, x, labels, shift_labels=shift)
    assert torch.allclose(out.loss, ref_loss, atol=1e-6)
    # Logits stay differentiable: a second term on them gets its gradient too.
    fused = grads_of(model, out.loss + out.logits.pow(2).mean())
    assert_close(fused, grads_of(model, ref_loss + ref_logits.pow(2).mean()), 1e-6)
    logits_only = grads_of(model, model(x, labels=labels).logits.pow(2).mean())
    assert_close(logits_only, grads_of(model, reference(model, x, labels)[1].pow(2).mean()), 1e-6)


def test_fused_loss_bf16_autocast_frozen_head_and_no_grad():
    model, x, labels = model_and_batch(tied=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=labels)
        ref_loss, ref_logits = reference(model, x, labels)
    assert out.logits.dtype == ref_logits.dtype == torch.bfloat16
    assert torch.equal(out.logits, ref_logits)
    assert torch.allclose(out.loss, ref_loss, atol=1e-5)
    assert_close(grads_of(model, out.loss), grads_of(model, ref_loss), 2e-2)  # bf16 matmuls, fp32 accumulation
    model.lm_head.weight.requires_grad_(False)
    fused = grads_of(model, model(x, labels=labels).loss)
    assert_close(fused, grads_of(model, reference(model, x, labels)[0]), 1e-6)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x, labels=labels).loss, reference(model, x, labels)[0], atol=1e-6)


def test_custom_loss_function_and_logits_to_keep_take_the_ordinary_path():
    model, x, labels = model_and_batch()
    model.loss_function = lambda logits, labels, **kw: logits.float().mean() * 0 + 42.0
    assert model(x, labels=labels).loss.item() == 42.0
    del model._loss_function
    assert torch.allclose(model(x, labels=labels).loss, reference(model, x, labels)[0], atol=1e-6)
    assert model(x, logits_to_keep=1).logits.shape[1] == 1
