"""alpaca and ShareGPT data: recognised or declared, converted to chat messages, trained through SFT; bad rows and
bad declarations stop with one line that names the format expected."""

import json
import subprocess
import sys

import pytest
from tiny_outputs import REPO, sft_argv

from quill.data.formats import alpaca_messages, sharegpt_messages
from quill.data.sources import load_mixture, load_source
from quill.errors import QuillError

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba", "system": "Be exact."},
] * 8
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "2 + 2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "and 3 + 3?"},
            {"from": "gpt", "value": "6"},
        ]
    },
] * 12


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_alpaca_rows_become_a_user_turn_and_an_answer():
    assert alpaca_messages({"instruction": "Add.", "input": "2 + 3", "output": "5"}) == [
        {"role": "user", "content": "Add.\n\n2 + 3"},
        {"role": "assistant", "content": "5"},
    ]
    row = {"instruction": "And now?", "input": "", "output": "b", "system": "S", "history": [["first?", "a"]]}
    assert alpaca_messages(row) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "b"},
    ]


def test_sharegpt_speakers_map_to_roles():
    turns = [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert sharegpt_messages({"conversations": turns}) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_sources_are_recognised_by_their_columns_or_declared(tmp_path):
    alpaca = load_source(str(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)))
    assert alpaca.column_names == ["messages"]
    assert alpaca[0]["messages"][0] == {"role": "user", "content": "Add the numbers.\n\n2 + 3"}
    sharegpt = load_source({"path": str(write_jsonl(tmp_path / "sg.jsonl", SHAREGPT)), "format": "sharegpt"})
    assert sharegpt[1]["messages"][-1] == {"role": "assistant", "content": "6"}
    # Renamed into alpaca's columns, then recognised.
    renamed = [{"question": r["instruction"], "input": r["input"], "answer": r["output"]} for r in ALPACA]
    src = {"path": str(write_jsonl(tmp_path / "r.jsonl", renamed)), "columns": {"question": "instruction"}}
    src["columns"]["answer"] = "output"
    assert load_source(src).column_names == ["messages"]
    # Both formats mix: each is messages once converted.
    mix = load_mixture([str(tmp_path / "alpaca.jsonl"), str(tmp_path / "sg.jsonl")], seed=0, eval_size=2, stage="sft")
    assert len(mix["train"]) + len(mix["eval"]) == len(ALPACA) + len(SHAREGPT)
    # Quill's own columns pass untouched.
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "q", "completion": "a"}])
    assert load_source(str(plain)).column_names == ["prompt", "completion"]


def test_chat_text_renders_conversations_as_the_chat_template_does(tmp_path):
    """Mid-training trains on chats as plain text: exactly the template's layout, less the <|bos|> that
    tokenizer(text) adds itself."""
    from tiny_model import tiny_tokenizer

    chats = [r["messages"] for r in load_source(str(write_jsonl(tmp_path / "a.jsonl", ALPACA)))]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m, "task": "t"} for m in chats])
    texts = load_source({"path": str(path), "format": "chat_text"})
    assert texts.column_names == ["task", "text"]
    tokenizer = tiny_tokenizer()
    for chat, row in zip(chats, texts, strict=True):
        rendered = tokenizer.apply_chat_template(chat, tokenize=False)
        assert tokenizer.bos_token + row["text"] == rendered
        assert (
            tokenizer(row["text"])["input_ids"]
            == tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        )


@pytest.mark.parametrize(
    ("rows", "source", "expected"),
    [
        (
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}],
            {},
            "row 0: expected sharegpt turns {from, value} with from in {human, gpt, system",
        ),
        (
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}],
            {},
            "found turn 1 with keys ['from']",
        ),
        ([{"conversations": [{"from": "human", "value": "q"}]}], {}, "expected a sharegpt conversation with a gpt"),
        ([{"instruction": "q", "output": ""}], {}, "row 0: expected alpaca 'output' as non-empty text"),
        ([{"instruction": "q", "output": "a"}, {"instruction": 3, "output": "a"}], {}, "row 1: expected alpaca"),
        ([{"prompt": "q", "completion": "a"}], {"format": "alpaca"}, "expected alpaca columns instruction + output"),
        ([{"prompt": "q", "completion": "a"}], {"format": "vicuna"}, "unknown format 'vicuna'"),
        ([{"messages": [{"role": "bot", "content": "a"}]}], {"format": "chat_text"}, "row 0: expected chat_text"),
        ([{"prompt": "q"}], {"format": "chat_text"}, "expected chat_text columns messages"),
    ],
)
def test_malformed_sources_get_one_line_naming_the_format(rows, source, expected, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(QuillError) as err:
        load_source({"path": str(path), **source})
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_alpaca_and_sharegpt_train_through_sft(tiny, tmp_path):
    alpaca, sharegpt = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA), write_jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    out = tmp_path / "sft"
    mixture = f"dataset_mixture=[{{path: {alpaca}}}, {{path: {sharegpt}, format: sharegpt}}]"
    argv = [*sft_argv(out, tiny["pre"], mixture, "max_steps=3", "eval_size=4", "packing=false")]
    done = subprocess.run(
        [sys.executable, "-m", "quill.stages.sft", *argv], cwd=REPO, env=tiny["env"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "quill_stage.json").read_text())["done"] is True
    losses = [r["loss"] for r in json.loads((out / "training_log.json").read_text()) if "loss" in r]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "q"}]}] * 20)
    argv = sft_argv(tmp_path / "sft_bad", tiny["pre"], f"dataset_mixture=[{{path: {bad}}}]", "eval_size=2")
    done = subprocess.run(
        [sys.executable, "-m", "quill.stages.sft", *argv], cwd=REPO, env=tiny["env"], capture_output=True, text=True
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "expected a sharegpt conversation with a gpt turn" in line
