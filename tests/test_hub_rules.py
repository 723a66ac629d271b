"""Pushes meet the Hub's own rules, as the strict loopback server applies them (tests/hub_card_rules.py):
a card with a local path in its metadata is refused, Quill's cards pass, `hub_private_repo` makes a private repo,
and a refusal (4xx other than 429) fails at once with one line."""

from __future__ import annotations

import hub_card_rules

from quill.hub import model_card

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
