"""Quill model: backends agree, packed rows stay separate, generation, checkpointing, save/load, PEFT, TRL; the
first three for every architecture the config allows (position encoding x norm placement x norm type x MLP, as a
decoder and as an encoder)."""

import copy
import itertools
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, DynamicCache

import quill.model.layers_quill as layers_quill
import quill.model.modeling_quill as modeling_quill
from quill.model import (
    PACKED_ATTENTION,
    QuillConfig,
    QuillForCausalLM,
    QuillForMaskedLM,
    QuillForSequenceClassification,
)
from quill.model.configuration_quill import NORM_POSITIONS, NORM_TYPES, POSITION_EMBEDDINGS
from quill.model.kernels_quill import SHORT_DOCUMENT_LEN, DocumentLayout

# "sdpa" is Quill's default and its packing-aware path; PACKED_ATTENTION ("quill_sdpa") names that kernel alone.
BACKENDS = ["eager", "sdpa", PACKED_ATTENTION]
# transformers 5.24 renamed the KV-cache argument past_key_values -> cache; before that past_key_values is the name.
CACHE_RENAMED = Version(transformers.__version__).release >= (5, 24)
# Every architecture the config allows. The plain MLP's activations differ only by the function applied (gelu here;
# relu and gelu_new are checked in test_model_options.py).
ARCHITECTURES = [
    dict(position_embedding=p, norm_position=n, norm_type=t, hidden_act=a)
    for p, n, t, a in itertools.product(POSITION_EMBEDDINGS, NORM_POSITIONS, NORM_TYPES, ("silu", "gelu"))
]
ARCH_IDS = ["-".join(a.values()) for a in ARCHITECTURES]


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


def tiny_model(attn=None, seed=0, **overrides) -> QuillForCausalLM:
    """attn None: the default attention, as a user gets it (sdpa)."""
    torch.manual_seed(seed)
    model = QuillForCausalLM(tiny_config(**overrides))
    if attn is not None:
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

    model = tiny_model()  # the default, sdpa
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


def test_default_attention_is_sdpa_when_built_and_when_loaded(tmp_path):
    """transformers' convention (and its common model tests): no attn_implementation means "sdpa"."""
    model = QuillForCausalLM(tiny_config())
    assert model.config._attn_implementation == "sdpa"
    assert AutoModelForCausalLM.from_config(tiny_config()).config._attn_implementation == "sdpa"
    assert QuillForSequenceClassification(tiny_config(num_labels=1)).config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    assert QuillForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    for attn in ("eager", PACKED_ATTENTION):  # a name asked for still wins
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn)
        assert loaded.config._attn_implementation == attn


def record_attention(monkeypatch) -> dict:
    """Every SDPA call's (query length, key length, mask), every mask Quill builds, every packed-kernel call."""
    seen = {"sdpa": [], "masks": [], "packed": 0}
    sdpa, create, packed = (
        torch.nn.functional.scaled_dot_product_attention,
        layers_quill.create_causal_mask,
        modeling_quill.packed_sdpa_attention_forward,
    )

    def spy_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        seen["sdpa"].append((query.shape[-2], key.shape[-2], attn_mask))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    def spy_mask(*args, **kwargs):
        seen["masks"].append(create(*args, **kwargs))
        return seen["masks"][-1]

    def spy_packed(*args, **kwargs):
        seen["packed"] += 1
        return packed(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(layers_quill, "create_causal_mask", spy_mask)
    monkeypatch.setattr(modeling_quill, "packed_sdpa_attention_forward", spy_packed)
    return seen


def test_sdpa_attends_packed_rows_per_document_and_everything_else_the_stock_way(monkeypatch):
    model = tiny_model()  # the default: sdpa
    layers = model.config.num_hidden_layers
    lengths = [7, 23, 4, 45]
    _, ids, pos = packed_row(lengths)
    dense = torch.randint(3, 101, (2, 20))
    padding = torch.ones_like(dense)
    padding[0, :5] = 0
    with torch.no_grad():
        # Packed row: no mask built at all, SDPA runs per document (45 alone, the short ones in buckets), unmasked.
        seen = record_attention(monkeypatch)
        model(ids, position_ids=pos)
        assert seen["masks"] == [] and seen["packed"] == layers
        assert all(mask is None for _, _, mask in seen["sdpa"])
        assert max(q for q, _, _ in seen["sdpa"]) == max(lengths) < ids.shape[1]

        # One document per row: transformers' stock sdpa, the causal kernel over the whole row, no mask.
        seen = record_attention(monkeypatch)
        cache = DynamicCache(config=model.config)
        model(dense, cache=cache, use_cache=True)
        assert seen["masks"] == [None] and seen["packed"] == 0
        assert [(q, k, mask) for q, k, mask in seen["sdpa"]] == [(20, 20, None)] * layers

        # Padding mask: the stock path with transformers' mask.
        seen = record_attention(monkeypatch)
        model(dense, attention_mask=padding)
        assert len(seen["masks"]) == 1 and seen["masks"][0] is not None and seen["packed"] == 0
        assert all(mask is not None and (q, k) == (20, 20) for q, k, mask in seen["sdpa"])

        # Decoding with a KV cache: the stock path, one query against the cached keys.
        seen = record_attention(monkeypatch)
        model(dense[:, :1], cache=cache, use_cache=True)
        assert seen["packed"] == 0 and [(q, k) for q, k, _ in seen["sdpa"]] == [(1, 21)] * layers


def test_packed_rows_stay_apart_under_torch_compile():
    """Under torch.compile finding documents is data-dependent control flow, so sdpa leaves packed rows to
    transformers' block mask there: no graph break (fullgraph=True), and the logits of the per-document path."""
    model = tiny_model()
    _, ids, pos = packed_row([7, 23, 40])
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # dynamo only: seconds, not inductor's minutes
    with torch.no_grad():
        assert max_diff(compiled(ids, position_ids=pos).logits, model(ids, position_ids=pos).logits) <= 1e-5


def calls_and_warnings(call):
    """call()'s result, and the warnings it gave that name `past_key_values`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [w for w in caught if "past_key_values" in str(w.message)]


def test_old_cache_name_warns_from_5_24_on_and_still_feeds_the_cache():
    """From 5.24 on `cache=` is the name: `past_key_values=` warns once per call with the FutureWarning Llama's
    forwards give, and still reaches the cache. Before 5.24 it is the name generate() passes: no warning."""
    model = tiny_model(initializer_range=0.5)  # sharp: a step decoded without its context gives other logits
    ids = torch.randint(3, 101, (2, 10))
    prompt, step = ids[:, :9], ids[:, 9:]
    new, old = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        uncached = model(ids).logits[:, -1]
        model(prompt, cache=new, use_cache=True)
        want = model(step, cache=new, use_cache=True).logits[:, -1]
        _, warned_prefill = calls_and_warnings(lambda: model(prompt, past_key_values=old, use_cache=True))
        out, warned_step = calls_and_warnings(lambda: model(step, past_key_values=old, use_cache=True))
        backbone = DynamicCache(config=model.config)
        _, warned_backbone = calls_and_warnings(lambda: model.model(ids, past_key_values=backbone, use_cache=True))
        alone = model(step).logits[:, -1]
    # The old name reached the cache: same logits as `cache=`, and as the uncached forward.
    assert old.get_seq_length() == new.get_seq_length() == backbone.get_seq_length() == 10
    assert torch.equal(out.logits[:, -1], want) and max_diff(want, uncached) <= 1e-4
    assert max_diff(alone, want) > 1e-2  # without its context the step would differ
    warned = [warned_prefill, warned_step, warned_backbone]
    if CACHE_RENAMED:
        assert [len(w) for w in warned] == [1, 1, 1]  # once per call: the head hands `cache=` to the backbone
        assert all(w[0].category is FutureWarning and "Use `cache` instead" in str(w[0].message) for w in warned)
        assert "QuillForCausalLM.forward" in str(warned_step[0].message)
        assert "QuillModel.forward" in str(warned_backbone[0].message)
    else:
        assert warned == [[], [], []]
    # generate() passes the installed release's name: never the warning, under 5.23 or 5.24.
    generated, warned_generate = calls_and_warnings(
        lambda: model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    )
    assert generated.shape == (2, 12) and warned_generate == []


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
    assert type(loaded) is QuillForCausalLM and loaded.config._attn_implementation == "sdpa"
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


def test_torch_compile_matches_eager_forward_and_backward():
    """torch.compile's default backend (inductor: generated C++ kernels on CPU) compiles the whole training step,
    forward with the fused head + loss and backward through the hand-written kernels, as one graph
    (fullgraph=True: a graph break fails here) and gives eager's logits, loss and gradients. ~20-60 s on 2 cores."""
    model = tiny_model("sdpa").train()
    x = torch.randint(3, 101, (2, 16))
    compiled = torch.compile(model, fullgraph=True)  # backend="inductor", the default
    got = compiled(x, labels=x)
    got.loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want = model(x, labels=x)
    want.loss.backward()
    assert max_diff(got.logits, want.logits) <= 1e-5 and max_diff(got.loss, want.loss) <= 1e-5
    assert compiled_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        diff, scale = max_diff(compiled_grads[name], p.grad), max(1.0, p.grad.abs().max().item())
        assert diff <= 1e-5 * scale, f"{name}: compiled gradient differs from eager by {diff:.3g}"


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


# ----------------------------------------------------------------------------------------------------------------
# Every architecture: the guarantees above hold for each position encoding, norm placement, norm type and MLP,
# as a decoder (CausalLM) and as an encoder (MaskedLM).
# ----------------------------------------------------------------------------------------------------------------


def arch_model(arch: dict, is_decoder: bool, attn: str | None = None, **overrides):
    torch.manual_seed(0)
    config = tiny_config(is_decoder=is_decoder, **arch, **overrides)
    model = (QuillForCausalLM if is_decoder else QuillForMaskedLM)(config)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model.eval()


@pytest.mark.parametrize("is_decoder", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_every_architecture_backends_agree_with_padding_and_gradients(arch, is_decoder):
    ref = arch_model(arch, is_decoder, "eager").train()
    x = torch.randint(3, 101, (2, 24))
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding (decoders) / padding anywhere (encoders): real tokens must not see it
    labels = x.masked_fill(mask == 0, -100)
    labels[0, 5] = -100  # a causal loss would read it from the last pad position, whose output is arbitrary
    results = {}
    for attn in BACKENDS:
        model = with_backend(ref, attn)
        out = model(x, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[attn] = (out.logits.detach()[mask.bool()], grads)
    for attn in BACKENDS[1:]:
        assert max_diff(results[attn][0], results["eager"][0]) <= 1e-5, attn
        assert max_diff(results[attn][1], results["eager"][1]) <= 1e-5, attn


@pytest.mark.parametrize("is_decoder", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_every_architecture_keeps_packed_documents_apart(arch, is_decoder):
    docs, ids, pos = packed_row([7, 23, 4, 30])
    for attn in BACKENDS:
        model = arch_model(arch, is_decoder, attn)
        with torch.no_grad():
            packed = model(ids, position_ids=pos).logits[0]
            start = 0
            for doc in docs:
                alone = model(doc[None]).logits[0]
                assert max_diff(packed[start : start + len(doc)], alone) <= 1e-5, (attn, start)
                start += len(doc)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_every_decoder_architecture_decodes_the_same_with_and_without_cache(arch):
    """Per-step logits with and without the KV cache, and a left-padded batch row decoding its unpadded tokens."""
    prompt = torch.randint(3, 101, (1, 9))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    scores = dict(output_logits=True, return_dict_in_generate=True)
    for attn in ("eager", "sdpa"):
        model = arch_model(arch, True, attn, initializer_range=0.5)
        cached = model.generate(prompt, use_cache=True, **kwargs, **scores)
        uncached = model.generate(prompt, use_cache=False, **kwargs, **scores)
        assert torch.equal(cached.sequences, uncached.sequences), attn
        for step, (a, b) in enumerate(zip(cached.logits, uncached.logits, strict=True)):
            assert max_diff(a, b) <= 1e-4, (attn, step)
        other = torch.randint(3, 101, (1, 14))
        ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), prompt], dim=1), other])
        mask = (torch.arange(14)[None] >= torch.tensor([[5], [0]])).long()
        batched = model.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(batched[0, 14:], cached.sequences[0, 9:]), attn


@pytest.mark.parametrize("is_decoder", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("position", POSITION_EMBEDDINGS)
def test_every_position_encoding_trains_under_bf16_autocast_with_padding(position, is_decoder):
    """Mixed precision with a padded batch: a finite loss and gradients on every backend, and bf16 logits within bf16
    error of fp32 at the real tokens (ALiBi's float mask is cast to bf16, where fp32's minimum would be -inf)."""
    x = torch.randint(3, 101, (2, 20))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    for attn in BACKENDS:
        model = arch_model(dict(position_embedding=position), is_decoder, attn).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, attention_mask=mask, labels=x)
        out.loss.backward()
        assert torch.isfinite(out.loss), attn
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), attn
        with torch.no_grad():
            reference = model(x, attention_mask=mask).logits
        assert max_diff(out.logits.float()[mask.bool()], reference[mask.bool()]) <= 0.05, attn
