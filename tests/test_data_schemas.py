import datasets
import pytest

from quill.data.schemas import check_schema
from quill.errors import QuillError

USER = {"role": "user", "content": "2 + 2 ="}
ANSWER = {"role": "assistant", "content": "4"}


def ds(rows):
    return datasets.Dataset.from_list(rows)


def error(rows, stage, source="data/x.jsonl") -> str:
    with pytest.raises(QuillError) as err:
        check_schema(ds(rows) if isinstance(rows, list) else rows, stage, source)
    message = str(err.value)
    assert "\n" not in message and "; fix: " in message and source in message
    return message


def test_formats_detected():
    assert check_schema(ds([{"text": "hello"}]), "pretrain", "s") == "text"
    assert check_schema(ds([{"messages": [USER, ANSWER]}]), "sft", "s") == "messages"
    assert check_schema(ds([{"prompt": "q", "completion": "a"}]), "sft", "s") == "prompt_completion"
    assert check_schema(ds([{"prompt": [USER], "completion": [ANSWER]}]), "sft", "s") == (
        "prompt_completion_conversational"
    )
    assert check_schema(ds([{"prompt": "q", "chosen": "a", "rejected": "b"}]), "dpo", "s") == "preference"
    pref = [{"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "5"}]}]
    assert check_schema(ds(pref), "reward", "s") == "preference_conversational"
    assert check_schema(ds([{"chosen": "a", "rejected": "b"}]), "dpo", "s") == "implicit_preference"
    assert check_schema(ds([{"prompt": [USER], "task": "chain_sum"}]), "rl", "s") == "prompt_conversational"
    assert check_schema(ds([{"prompt": "q"}]), "rl", "s") == "prompt"
    streamed = ds([{"text": "a"}, {"text": "b"}]).to_iterable_dataset()
    assert check_schema(streamed, "pretrain", "s") == "text"


def test_missing_and_misnamed_columns():
    message = error([{"body": "x"}], "pretrain")
    assert "expected columns text for stage 'pretrain', found columns ['body']" in message
    message = error([{"txt": "x"}], "pretrain")
    assert "columns: {txt: text}" in message  # the fix suggests the rename
    message = error([{"conversations": [USER, ANSWER]}], "sft")
    assert "expected columns messages or prompt+completion" in message and "{conversations: messages}" in message
    assert "expected columns prompt+chosen+rejected or chosen+rejected" in error([{"chosen": "a"}], "dpo")


def test_bad_rows_name_row_and_column():
    rows = [{"messages": [USER, ANSWER]}] * 17 + [{"messages": [USER, {"role": "bot", "content": "4"}]}]
    assert error(rows, "sft", "data/sft.jsonl").startswith(
        "data/sft.jsonl row 17, column 'messages': expected role in {system,user,assistant}, found 'bot'; fix: "
    )
    assert "row 1, column 'messages': expected at least one assistant turn, found roles ['user']" in error(
        [{"messages": [USER, ANSWER]}, {"messages": [USER]}], "sft"
    )
    assert "row 0, column 'rejected': expected a rejected answer different from chosen" in error(
        [{"prompt": "q", "chosen": "same", "rejected": "same"}], "dpo"
    )
    conv = {"prompt": [USER], "chosen": [ANSWER], "rejected": [ANSWER]}
    assert "row 0, column 'rejected'" in error([conv], "reward")
    assert "row 1, column 'text': expected a non-empty string, found '  '" in error(
        [{"text": "ok"}, {"text": "  "}], "pretrain"
    )
    message = error([{"text": None}], "pretrain")
    assert "row 0, column 'text': expected a non-empty string, found NoneType None" in message
    sharegpt = [{"messages": [{"from": "human", "value": "hi"}]}]
    assert "ShareGPT" in error(sharegpt, "sft")
    mixed = ds([{"prompt": "q", "completion": "a"}]).to_list() + [{"prompt": "q2", "completion": "b"}]
    assert check_schema(ds(mixed), "sft", "s") == "prompt_completion"
    assert "expected a non-empty string" in error([{"prompt": "q", "completion": ""}], "sft")


def test_empty_dataset_and_unknown_stage():
    empty = ds([{"text": "a"}]).select([])
    assert "found an empty dataset" in error(empty, "pretrain")
    assert "unknown stage 'grpo'" in error([{"text": "a"}], "grpo")


def test_rename_suggestions():
    assert "columns: {question: prompt, response: completion}" in error([{"question": "q", "response": "a"}], "sft")
    assert "columns: {prompt: prompt" not in error([{"prompt": "q", "reply": "a"}], "sft")
    assert "rename your columns" in error([{"zzz": "q"}], "rl")
