"""Pushes meet the Hub's own rules, as the strict loopback server applies them (tests/hub_card_rules.py):
a card with a local path in its metadata is refused, Quill's cards pass, `hub_private_repo` makes a private repo,
and a refusal (4xx other than 429) fails at once with one line."""

from __future__ import annotations

import json

import hub_card_rules
import pytest
from huggingface_hub import ModelCardData

from quill.hub import is_hub_id, model_card

LOCAL_CARD = "---\nlibrary_name: transformers\nbase_model: /home/me/runs/pretrain\ndatasets:\n- ./data/sft.jsonl\n---\n"

# argv: folder, repo id, private (0/1)[, revision]. Prints the pushed url or the one-line QuillError.
PUSH = """
    import sys
    from quill.errors import QuillError
    from quill.hub import push_folder
    revision = sys.argv[4] if len(sys.argv) > 4 else None
    try:
        print("PUSHED", push_folder(sys.argv[1], sys.argv[2], sys.argv[3] == "1", revision, attempts=3, wait=0))
    except QuillError as err:
        print("ERROR", err.problem)
        sys.exit(2)
"""


def test_the_validator_follows_the_hubs_rules():
    errors, _ = hub_card_rules.validate(LOCAL_CARD)
    assert any("base_model" in e for e in errors) and any("datasets" in e for e in errors), errors
    assert hub_card_rules.validate("---\nbase_model: gpt2\ndatasets:\n- HuggingFaceTB/smoltalk\n---\n")[0] == []
    assert hub_card_rules.validate("---\nlicense: not-a-license\n---\n")[0]


def test_quill_cards_pass_and_a_local_path_card_is_refused_once(hub_server, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    card = model_card(
        stage="sft",
        base_model="/home/me/runs/pretrain",  # a local folder: neither in the metadata nor anywhere in the card
        datasets=["HuggingFaceTB/smoltalk", "quill:default/sft_train", "/home/me/data.jsonl"],
        metrics={"eval_loss": 1.5},
    )
    assert "/home/me" not in card
    assert hub_card_rules.validate(card)[0] == []
    (good / "README.md").write_text(card)
    (good / "config.json").write_text("{}")
    pushed = hub_server.run_python(PUSH, str(good), "user/good", "1")
    assert "PUSHED" in pushed.stdout, pushed.stdout
    repo = hub_server.server.store.get("model", "user/good")
    assert repo.private and "README.md" in repo.resolve("main").files  # hub_private_repo: true is honoured

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "README.md").write_text(LOCAL_CARD)
    before = len(hub_server.requests("POST", "/api/models/user/bad/commit/"))
    refused = hub_server.run_python(PUSH, str(bad), "user/bad", "0", check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    # huggingface_hub turns the validator's 400 into a ValueError naming the rule broken.
    assert "not retried" in refused.stdout and "is not a valid model id" in refused.stdout, refused.stdout
    assert len(hub_server.requests("POST", "/api/models/user/bad/commit/")) - before <= 1  # not retried


def test_hub_revision_pushes_to_that_branch(hub_server, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text(model_card(stage="sft", base_model="gpt2", datasets=[], metrics={}))
    (folder / "config.json").write_text("{}")
    hub_server.run_python(PUSH, str(folder), "user/branched", "0", "dev")
    repo = hub_server.server.store.get("model", "user/branched")
    assert "config.json" in repo.resolve("dev").files and "config.json" not in repo.resolve("main").files


@pytest.mark.parametrize(
    "name",
    ["org/model-", "org/model.", "a--b/c", "org/m", "m", "org/m.v1_2", "-org/m", "a..b", "a/b/c", "m.git", "x" * 97],
)
def test_is_hub_id_agrees_with_the_hubs_rules(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local file or folder of any of these names
    assert is_hub_id(name) == hub_card_rules.is_repo_id(name), name


def test_a_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "m").mkdir(parents=True)  # the library cannot know this: loading would pick the folder
    assert hub_card_rules.is_repo_id("org/m") and not is_hub_id("org/m")
    assert not is_hub_id(None)


def test_card_front_matter_is_what_model_card_data_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage = "sft: v2 #1"  # a custom stage name that hand-written YAML would turn into a mapping and a comment
    card = model_card(stage=stage, base_model="gpt2", datasets=["org/data", "./local", "quill:default/x"], metrics={})
    expected = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["quill", stage],
        base_model="gpt2",
        datasets=["org/data"],
    )
    assert hub_card_rules.front_matter(card) == expected.to_dict()
    assert hub_card_rules.validate(card)[0] == []
    # Local sources only: neither key is written, and the body says so without the paths.
    card = model_card(
        stage="reward", base_model="org/model-", datasets=["./local"], metrics={"acc": 0.5}, classifier=True
    )
    assert hub_card_rules.front_matter(card) == {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["quill", "reward"],
    }
    assert "| acc | 0.5 |" in card and 'pipeline("text-classification"' in card and "./local" not in card


def test_only_the_main_process_pushes_the_tokenizer(tmp_path, monkeypatch):
    from quill.options import parse_stage_args
    from quill.stages import tokenizer

    monkeypatch.chdir(tmp_path)
    text = "".join(
        json.dumps({"text": f"line {i}: the quick brown fox jumps over {7 * i} lazy dogs"}) + "\n" for i in range(60)
    )
    (tmp_path / "d.jsonl").write_text(text)
    argv = ["dataset_mixture=[d.jsonl]", "eval_size=10", "vocab_size=300", "min_frequency=1", "output_dir=tok"]
    argv += ["push_to_hub=true", "hub_model_id=user/tok"]
    pushed = []
    monkeypatch.setattr(tokenizer, "push_stage", lambda folder, output, name: pushed.append(output.hub_model_id))
    monkeypatch.setattr(tokenizer, "is_main_process", lambda: False)  # another rank of a launched run
    tokenizer.train(*parse_stage_args(tokenizer.ARG_TYPES, argv))
    assert pushed == []
    monkeypatch.setattr(tokenizer, "is_main_process", lambda: True)
    tokenizer.train(*parse_stage_args(tokenizer.ARG_TYPES, argv))
    assert pushed == ["user/tok"]
