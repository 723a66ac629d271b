"""Quill model: backends agree, packed rows stay separate, generation, checkpointing, save/load, PEFT, TRL."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from quill.model import PACKED_ATTENTION, QuillConfig, QuillForCausalLM, QuillForSequenceClassification
from quill.model.kernels_quill import SHORT_DOCUMENT_LEN, DocumentLayout

BACKENDS = ["eager", "sdpa", PACKED_ATTENTION]


def tiny_config(**overrides) -> QuillConfig:
    fields = dict(
        depth=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=101,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return QuillConfig(**fields)


def tiny_model(attn=PACKED_ATTENTION, seed=0, **overrides) -> QuillForCausalLM:
    torch.manual_seed(seed)
    model = QuillForCausalLM(tiny_config(**overrides))
    model.set_attn_implementation(attn)
    return model.eval()


def with_backend(model, attn):
    other = copy.deepcopy(model)
    other.set_attn_implementation(attn)
    return other


def packed_row(doc_lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 101, (n,), generator=g) for n in doc_lengths]
    input_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths])[None]
    return docs, input_ids, position_ids


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_depth_dial_sets_sizes_and_fields_stay_overridable():
    c = QuillConfig(depth=4)
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.intermediate_size) == (256, 4, 4, 704)
    c = QuillConfig(depth=12)
    assert (c.hidden_size, c.num_attention_heads, c.head_dim) == (768, 12, 64)
    c = QuillConfig(depth=4, hidden_size=320, num_attention_heads=5, num_key_value_heads=1)
    assert (c.hidden_size, c.head_dim, c.num_key_value_heads) == (320, 64, 1)
    with pytest.raises(Exception, match="must be a multiple of num_key_value_heads"):
        QuillConfig(depth=4, num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_backends_agree_on_logits_and_gradients(qk_norm):
    ref = tiny_model("eager", qk_norm=qk_norm).train()
    x = torch.randint(3, 101, (3, 40))
    results = {}
    for attn in BACKENDS:
        model = with_backend(ref, attn)
        out = model(x, labels=x)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[attn] = (out.logits.detach(), grads)
    for attn in BACKENDS[1:]:
        assert max_diff(results[attn][0], results["eager"][0]) <= 1e-5, attn
        assert max_diff(results[attn][1], results["eager"][1]) <= 1e-5, attn


def test_backends_agree_on_packed_rows_with_gradients():
    ref = tiny_model("eager").train()
    docs, ids, pos = packed_row([5, 17, 1, 9, 32, 3, 41])  # 41: attended alone, the rest in buckets
    ids, pos = ids.repeat(2, 1), pos.repeat(2, 1)
    results = {}
    for attn in BACKENDS:
        model = with_backend(ref, attn)
        out = model(ids, position_ids=pos, labels=ids)
        out.loss.backward()
        results[attn] = (out.logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    for attn in BACKENDS[1:]:
        assert max_diff(results[attn][0], results["eager"][0]) <= 1e-5, attn
        assert max_diff(results[attn][1], results["eager"][1]) <= 1e-5, attn


@pytest.mark.parametrize("attn", BACKENDS)
def test_document_in_packed_row_matches_document_alone_with_default_use_cache(attn):
    model = tiny_model(attn)
    assert model.config.use_cache  # the default: transformers alone would leak across documents here
    docs, ids, pos = packed_row([7, 23, 4, 30, 45])
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits[0]
        start = 0
        for doc in docs:
            alone = model(doc[None]).logits[0]
            assert max_diff(packed[start : start + len(doc)], alone) <= 1e-5
            start += len(doc)


def test_packed_documents_through_trl_padding_free_collator():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = tiny_model(PACKED_ATTENTION)
    docs, _, _ = packed_row([11, 6, 37, 19])
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": d.tolist()} for d in docs]
    )
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for doc in docs:
            assert max_diff(packed[start : start + len(doc)], model(doc[None]).logits[0]) <= 1e-5
            start += len(doc)


def test_document_layout_covers_every_token_once():
    lengths = [1, 2, 3, 64, 65, 7, SHORT_DOCUMENT_LEN, SHORT_DOCUMENT_LEN + 1]
    _, ids, pos = packed_row(lengths)
    layout = DocumentLayout.from_position_ids(pos, batch=1)
    assert layout.lengths == lengths
    assert [lengths[i] for i in layout.alone] == [64, 65, SHORT_DOCUMENT_LEN + 1]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    covered = [t for i in layout.alone for t in range(starts[i], starts[i] + lengths[i])]
    for doc_ids, gather, keep in layout.buckets:
        real = gather.flatten()[keep]
        assert real.tolist() == [t for i in doc_ids for t in range(starts[i], starts[i] + lengths[i])]
        covered += real.tolist()
        # Buckets hold short lengths within a factor of two, so padding work is bounded.
        widths = [lengths[i] for i in doc_ids]
        assert max(widths) == gather.shape[1] <= SHORT_DOCUMENT_LEN and gather.shape[1] <= 2 * min(widths)
    assert sorted(covered) == list(range(ids.numel()))
    assert DocumentLayout.from_position_ids(torch.arange(10)[None], batch=3) is None


@pytest.mark.parametrize("attn", BACKENDS)
def test_greedy_generation_with_and_without_cache_and_left_padding(attn):
    model = tiny_model(attn)
    prompt = torch.randint(3, 101, (1, 9))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)

    other = torch.randint(3, 101, (1, 14))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), prompt], dim=1)
    ids = torch.cat([padded, other])
    mask = (torch.arange(14)[None] >= torch.tensor([[5], [0]])).long()
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(batched[0, 14:], with_cache[0, 9:])


@pytest.mark.parametrize("attn", BACKENDS)
def test_cached_decode_logits_equal_uncached_logits_at_every_step(attn):
    """generate() hands the KV cache to forward under the installed transformers' name (`cache=` from 5.24 on,
    `past_key_values=` before). A model that misses it decodes each step without context. The model is sharp
    (large weights), so such a miss changes the tokens, not just the logits."""
    model = tiny_model(attn, initializer_range=0.5)
    prompt = torch.randint(3, 101, (2, 9))
    kwargs = dict(
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits, strict=True)):
        assert max_diff(a, b) <= 1e-4, f"step {step}"
    # Sharp enough to matter: the first decode step without its context picks other tokens.
    with torch.no_grad():
        alone = model(cached.sequences[:, 9:10]).logits[:, -1]
    assert not torch.equal(alone.argmax(-1), cached.logits[1].argmax(-1))


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_model().train()
    x = torch.randint(3, 101, (2, 24))
    model(x, labels=x).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(x, labels=x).loss.backward()
    assert all(max_diff(a, p.grad) <= 1e-6 for a, p in zip(plain, model.parameters()))


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_gives_identical_logits(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is QuillForCausalLM and loaded.config._attn_implementation == PACKED_ATTENTION
    x = torch.randint(3, 101, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_sequence_classification_pools_last_non_pad_token():
    torch.manual_seed(0)
    model = QuillForSequenceClassification(tiny_config(num_labels=1)).eval()
    x = torch.randint(3, 101, (1, 10))
    right = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], 1)
    with torch.no_grad():
        alone = model(x).logits
        assert max_diff(model(right, attention_mask=(right != 0).long()).logits, alone) <= 1e-5
        assert max_diff(model(left, attention_mask=(left != 0).long()).logits, alone) <= 1e-5


def test_torch_compile_matches_eager_forward():
    model = tiny_model("sdpa")
    x = torch.randint(3, 101, (2, 16))
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        assert max_diff(compiled(x).logits, model(x).logits) <= 1e-5


def test_peft_lora_all_linear_trains_and_merges():
    from peft import LoraConfig, get_peft_model

    model = tiny_model().train()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    targeted = {n.split(".")[-1] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    names = {n for n, _ in peft_model.named_modules()}
    assert any("qkv_proj.lora_A" in n for n in names) and any("gate_up_proj.lora_A" in n for n in names)
    assert not any("lm_head.lora_A" in n for n in names), targeted
    x = torch.randint(3, 101, (4, 20))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(8):
        loss = peft_model(x, labels=x).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(x).logits
        merged = peft_model.merge_and_unload()
        assert type(merged) is QuillForCausalLM
        assert max_diff(merged(x).logits, adapted) <= 1e-4


def test_trl_fused_lm_head_log_probs_equal_model_log_probs():
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model()
    x = torch.randint(3, 101, (2, 18))
    labels = x.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        logits = model(x).logits[:, :-1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        add_fused_lm_head(model)
        fused = model(x, labels=labels, fused_lm_head=True).log_probs
    mask = labels[:, 1:] != -100
    assert fused.shape == expected.shape
    assert max_diff(fused[mask], expected[mask]) <= 1e-5


def test_packed_backend_under_bf16_autocast_keeps_documents_apart_and_tracks_fp32():
    """Under bf16 autocast on CPU, SDPA calls up to 256 wide run in fp32 (autocast off) and return bf16: the packed row
    must still equal each document alone, and stay within bf16 error of the fp32 model, with gradients flowing."""
    model = tiny_model().train()
    # 7, 23, 4, 30 share padded buckets (in fp32); 40 runs alone in fp32, 300 alone in bf16.
    docs, ids, pos = packed_row([7, 23, 4, 30, 40, 300])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, position_ids=pos, labels=ids)
        out.loss.backward()
        with torch.no_grad():
            start = 0
            for doc in docs:
                alone = model(doc[None]).logits[0].float()
                assert max_diff(out.logits[0, start : start + len(doc)].float(), alone) <= 1e-2
                start += len(doc)
    with torch.no_grad():
        reference = model(ids, position_ids=pos).logits
    assert max_diff(out.logits.float(), reference) <= 0.1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
