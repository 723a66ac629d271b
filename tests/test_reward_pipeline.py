"""The reward stage's folder works as `pipeline("text-classification")`: trained on planted pairs (a polite answer
chosen over a rude one), it returns the raw reward labelled `reward` for plain text and for a chat, the same number
the model's own logit gives, and scores a held-out polite answer above a rude one."""

import json
from pathlib import Path

import pytest
import torch
from tiny_outputs import build_tiny, run_quill

PROMPTS = [f"question number {i}: can you help me with {topic}?" for i in range(16) for topic in ("maths", "cooking")]
GOOD, BAD = "yes, gladly. here is how.", "no. go away."


def pair(prompt: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "chosen": [user, {"role": "assistant", "content": GOOD}],
        "rejected": [user, {"role": "assistant", "content": BAD}],
    }


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    tiny = build_tiny(tmp_path_factory.getbasetemp())
    base = tmp_path_factory.mktemp("reward")
    data = base / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair(p)) + "\n" for p in PROMPTS))
    out = base / "reward"
    args = [
        "reward",
        "--config",
        "recipes/tiny/reward.yaml",
        f"output_dir={out}",
        f"model_name_or_path={tiny['pre']}",
        f"dataset_mixture=[{{path: {data}}}]",
        "eval_size=4",
        "max_steps=25",
        "learning_rate=3e-3",
        "warmup_steps=0",
        "per_device_train_batch_size=8",
        "logging_steps=5",
        "save_steps=25",
        "use_cpu=true",
        "dataloader_num_workers=0",
        "agreement_samples=0",
        "report_to=[tensorboard]",  # a stage run on its own, outside quill run: its own tracker run
    ]
    done = run_quill(args, tiny["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    # pairs_from is left at auto, as a user who brings chosen/rejected pairs would leave it: the data decides.
    assert "training on the dataset's chosen/rejected pairs (pairs_from: auto" in done.stdout + done.stderr
    return out


def test_reward_folder_is_a_text_classification_pipeline(reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    pipe = pipeline("text-classification", model=str(reward_dir), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir, trust_remote_code=True).eval()

    def logit(ids: list[int]) -> float:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    # Plain text: the raw score (not squashed through a sigmoid), labelled `reward`.
    [plain] = pipe(["the sky is blue."])
    assert plain["label"] == "reward"
    assert plain["score"] == pytest.approx(logit(tokenizer("the sky is blue.")["input_ids"]), abs=1e-4)

    # A chat, rendered by the chat template, scores as the stage scored it; the planted preference was learnt.
    held_out = pair("would you help me with gardening?")
    scores = {}
    for side in ("chosen", "rejected"):
        text = tokenizer.apply_chat_template(held_out[side], tokenize=False)
        [result] = pipe([text], add_special_tokens=False)
        ids = tokenizer.apply_chat_template(held_out[side], tokenize=True, return_dict=True)["input_ids"]
        assert result["score"] == pytest.approx(logit(ids), abs=1e-4)
        scores[side] = result["score"]
    assert scores["chosen"] > scores["rejected"] + 0.5, scores


def test_reward_stage_reports_its_losses_to_tensorboard(reward_dir):
    pytest.importorskip("tensorboard", reason="the tracking extra (pip install quill[tracking]) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [project] = list((Path(reward_dir).parent / "tensorboard").iterdir())
    assert project.name.startswith("reward-")  # not under quill run: the stage is its own run
    events = EventAccumulator(str(project / "reward"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    log = json.loads((Path(reward_dir) / "training_log.json").read_text())
    expected = [(r["step"], r["loss"]) for r in log if "loss" in r]
    assert len(expected) == 5 and [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
