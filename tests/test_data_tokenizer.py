import pydoc_data.topics

import pytest
from transformers import AutoTokenizer
from trl.chat_template_utils import is_chat_template_stop_token_trained

from quill.data.tokenizer import (
    ASSISTANT,
    BOS,
    END,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    bytes_per_token,
    stop_token_ids,
    train_tokenizer,
)
from quill.errors import QuillError

TEXTS = [text for _, text in sorted(pydoc_data.topics.topics.items())]
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "State the final answer: 12 + 7 ="},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "Reverse this list of words: a, b"},
    {"role": "assistant", "content": " b, a\nDone."},
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = train_tokenizer(TEXTS[:60], vocab_size=600)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return tok, path


def test_round_trip_keeps_template_and_special_tokens(saved):
    tok, path = saved
    assert (path / "chat_template.jinja").exists()
    loaded = AutoTokenizer.from_pretrained(path)
    assert len(loaded) == len(tok) == 600
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS, EOS, PAD)
    for t in SPECIAL_TOKENS:  # each is one token, never split into pieces
        assert loaded.convert_ids_to_tokens(loaded(t, add_special_tokens=False)["input_ids"]) == [t]
    assert loaded.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False)
    assert loaded.apply_chat_template(CHAT, tokenize=False) == (
        "<|bos|><|system|>\nAnswer briefly.<|end|>\n<|user|>\nState the final answer: 12 + 7 =<|end|>\n"
        "<|assistant|>\n19<|end|>\n<|user|>\nReverse this list of words: a, b<|end|>\n"
        "<|assistant|>\n b, a\nDone.<|end|>\n"
    )
    prompt = loaded.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    text = "Hello world 2024"
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id and ids.count(loaded.bos_token_id) == 1  # BOS-aligned documents
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert stop_token_ids(loaded) == [loaded.convert_tokens_to_ids(END), loaded.eos_token_id]


def test_assistant_mask_is_exactly_assistant_content_plus_end(saved):
    _, path = saved
    tok = AutoTokenizer.from_pretrained(path)
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one from the post-processor
    masked = [i for i, m in zip(ids, mask) if m]
    end = tok.convert_tokens_to_ids(END)
    expected = []
    for message in CHAT:
        if message["role"] == "assistant":
            expected += tok(message["content"], add_special_tokens=False)["input_ids"] + [end]
    assert masked == expected
    # and the masked spans sit right after each "<|assistant|>\n"
    starts = [i + 2 for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids(ASSISTANT)]
    assert [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])] == starts
    assert is_chat_template_stop_token_trained(tok)  # TRL's own check that <|end|> is trained


def test_digits_are_single_tokens(saved):
    tok, _ = saved
    pieces = tok.convert_ids_to_tokens(tok("x = 12345 + 678", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("12345678")


def test_unknown_role_fails_in_template(saved):
    tok, _ = saved
    with pytest.raises(Exception, match="unknown chat role bot"):
        tok.apply_chat_template([{"role": "bot", "content": "hi"}], tokenize=False)


def test_bytes_per_token_improves_with_vocab():
    small = train_tokenizer(TEXTS[:60], vocab_size=300)
    big = train_tokenizer(TEXTS[:60], vocab_size=2000)
    held_out = TEXTS[60:]
    assert 1.0 < bytes_per_token(small, held_out) < bytes_per_token(big, held_out)
    with pytest.raises(QuillError, match="non-empty texts"):
        bytes_per_token(big, [""])


def test_bad_vocab_size():
    with pytest.raises(QuillError, match="vocab_size") as err:
        train_tokenizer(TEXTS[:5], vocab_size=100)
    assert "\n" not in str(err.value)


def test_special_token_text_in_training_data_is_not_merged():
    chat_docs = ["<|user|>\nWhat is 1 + 2?<|end|>\n<|assistant|>\n3<|end|>\n"] * 200
    tok = train_tokenizer(TEXTS[:20] + chat_docs, vocab_size=800)
    assert sorted(t for t in tok.get_vocab() if "<|" in t or "|>" in t) == sorted(SPECIAL_TOKENS)


def test_pretraining_task_documents_match_the_chat_template(saved):
    from quill.data.default_data import chat_text

    tok, _ = saved
    chat = [{"role": "user", "content": "State the final answer: 1 + 2 ="}, {"role": "assistant", "content": "3"}]
    assert BOS + chat_text(chat[0]["content"], "3") == tok.apply_chat_template(chat, tokenize=False)
    # tokenizer(text) adds the BOS, so a task document tokenizes exactly like the SFT conversation
    ids = tok(chat_text(chat[0]["content"], "3"))["input_ids"]
    assert ids == tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
