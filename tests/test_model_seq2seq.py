"""QuillForConditionalGeneration: the decoder reads the encoder through cross-attention (and not its padding),
cached generation equals uncached decoding step by step, and a saved checkpoint answers through transformers'
translation pipeline in a process where the project cannot be imported."""

import json

import pytest
import torch
from test_remote_code import run_isolated
from tiny_model import tiny_config, tiny_tokenizer
from transformers import AutoModelForSeq2SeqLM

import quill.model  # noqa: F401  registers Quill with the Auto classes
from quill.model.modeling_quill_seq2seq import QuillForConditionalGeneration

SOURCES = ["the quick brown fox jumps", "two plus two"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def seq2seq(tokenizer, seed=0, attn="sdpa", **overrides):
    torch.manual_seed(seed)
    # A wide init makes the random model's next-token choices sharp, so a wrong cache or mask changes them.
    fields = {"is_encoder_decoder": True, "initializer_range": 0.2, "num_decoder_layers": 2, **overrides}
    model = AutoModelForSeq2SeqLM.from_config(tiny_config(tokenizer, **fields)).eval()
    model.set_attn_implementation(attn)
    return model


def test_auto_class_builds_the_seq2seq_model(tokenizer):
    model = seq2seq(tokenizer)
    assert type(model) is QuillForConditionalGeneration
    assert model.config.is_encoder_decoder and model.config.decoder_start_token_id == tokenizer.bos_token_id
    shared = model.get_input_embeddings().weight
    assert model.model.encoder.embed_tokens.weight is shared and model.model.decoder.embed_tokens.weight is shared
    assert model.lm_head.weight is shared


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cross_attention_reads_the_source_but_not_its_padding(tokenizer, attn):
    model = seq2seq(tokenizer, attn=attn)
    decoder_input_ids = torch.tensor([[tokenizer.bos_token_id, 17, 42, 99]])

    def logits(source_ids, mask=None):
        with torch.no_grad():
            out = model(input_ids=source_ids, attention_mask=mask, decoder_input_ids=decoder_input_ids)
        return out.logits

    a = tokenizer(SOURCES[0], return_tensors="pt").input_ids
    b = a.clone()
    b[0, 2] = tokenizer(" lazy", add_special_tokens=False).input_ids[0]  # one source word changed
    # A different source changes every decoder position's logits: the decoder reads the encoder.
    assert (logits(a) - logits(b)).abs().amax(-1).min() > 1e-2
    # Padding the source (either side) changes nothing: padded keys are masked, positions count real tokens.
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer([SOURCES[0], SOURCES[0] + " over the lazy dog"], return_tensors="pt", padding=True)
        assert batch.attention_mask[0].sum() < batch.attention_mask.shape[1]  # the first row really is padded
        padded = logits(batch.input_ids[:1], batch.attention_mask[:1])
        torch.testing.assert_close(padded, logits(a), atol=1e-5, rtol=1e-5)
    tokenizer.padding_side = "right"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_generation_equals_uncached_decoding(tokenizer, attn):
    model = seq2seq(tokenizer, attn=attn)
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    out = model.generate(
        **batch, max_new_tokens=8, do_sample=False, eos_token_id=None, output_scores=True, return_dict_in_generate=True
    )
    cache = out.get("cache", out.get("past_key_values"))
    assert type(cache).__name__ == "EncoderDecoderCache"
    assert all(cache.is_updated.values()) and len(cache.is_updated) == model.config.num_decoder_layers
    # Cross-attention keys/values were computed once, from the whole source, and reused.
    assert cache.cross_attention_cache.get_seq_length() == batch.input_ids.shape[1]
    assert cache.self_attention_cache.get_seq_length() == out.sequences.shape[1] - 1
    with torch.no_grad():
        full = model(**batch, decoder_input_ids=out.sequences[:, :-1], use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.scores, 1), full, atol=1e-4, rtol=1e-4)
    assert (out.sequences[:, 0] == tokenizer.bos_token_id).all()  # decoding starts at decoder_start_token_id


def test_loss_is_teacher_forced_cross_entropy(tokenizer):
    model = seq2seq(tokenizer)
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    labels = torch.tensor([[5, 6, 7, tokenizer.eos_token_id], [8, 9, tokenizer.eos_token_id, -100]])
    out = model(**batch, labels=labels)
    decoder_input_ids = torch.tensor([[tokenizer.bos_token_id, 5, 6, 7], [tokenizer.bos_token_id, 8, 9, 2]])
    decoder_input_ids[1, 3] = tokenizer.pad_token_id
    logits = model(**batch, decoder_input_ids=decoder_input_ids).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_options_it_cannot_honour_are_refused(tokenizer):
    with pytest.raises(ValueError, match="alibi"):
        seq2seq(tokenizer, position_embedding="alibi")


def test_translation_pipeline_without_the_project(tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    model = seq2seq(tokenizer)
    model.generation_config.eos_token_id = None  # a random model: generate the full length so the texts compare
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    auto_map = json.loads((ckpt / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSeq2SeqLM"] == "modeling_quill_seq2seq.QuillForConditionalGeneration"
    assert "AutoModelForCausalLM" not in auto_map  # a seq2seq folder does not claim to be a decoder-only LM
    assert (ckpt / "modeling_quill_seq2seq.py").exists() and (ckpt / "modeling_quill.py").exists()
    ids = tokenizer(SOURCES[0], return_tensors="pt")
    expected = tokenizer.decode(model.generate(**ids, max_new_tokens=6, do_sample=False)[0], skip_special_tokens=True)
    result = run_isolated(
        f"""
        import json
        try:
            import quill
            raise SystemExit("the project is importable: the test would prove nothing")
        except ImportError:
            pass
        from transformers import pipeline
        out = {{}}
        for task in ("translation", "text2text-generation"):
            pipe = pipeline(task, model={str(ckpt)!r}, trust_remote_code=True)
            key = "translation_text" if task == "translation" else "generated_text"
            out[task] = pipe({SOURCES[0]!r}, max_new_tokens=6, do_sample=False)[0][key]
        out["module"] = type(pipe.model).__module__
        out["class"] = type(pipe.model).__name__
        print(json.dumps(out))
    """,
        tmp_path,
    )
    assert result["translation"] == expected and result["text2text-generation"] == expected
    assert result["class"] == "QuillForConditionalGeneration"
    assert result["module"].startswith("transformers_modules.")  # the copied code, not the project
