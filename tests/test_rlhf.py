"""The RLHF branch's RL optimises the reward model's score. The start policy holds two behaviours (trained to
answer "yes" or "no" at random); a planted reward model whose preference is known exactly (answers that start with
one of them, tests/planted_reward.py) then moves GRPO, with the verifiable reward off, toward that answer, and a
run on the opposite preference moves it the other way: the direction comes from the reward model."""

import json
import random

import pytest
import torch
from planted_reward import save_first_token_reward_model
from tiny_outputs import rl_argv, run_quill, sft_argv

from quill.metrics import prompt_ids

PROMPTS = [f"question {i}: shall we {verb}?" for i in range(64) for verb in ("go", "stay")]


def first_token_share(model_dir, prompts: list, yes: int, no: int) -> float:
    """Mean P(yes) / (P(yes) + P(no)) for the first token of the policy's answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shares = []
    with torch.no_grad():
        for p in prompts:
            probs = model(torch.tensor([prompt_ids(tokenizer, p)])).logits[0, -1].softmax(-1)
            shares.append((probs[yes] / (probs[yes] + probs[no])).item())
    return sum(shares) / len(shares)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("rlhf")
    tokenizer = AutoTokenizer.from_pretrained(tiny["tok"])
    yes, no = tokenizer.encode("yes", add_special_tokens=False)[0], tokenizer.encode("no", add_special_tokens=False)[0]
    assert yes != no
    rng = random.Random(0)
    chats, prompts = base / "yes_no.jsonl", base / "prompts.jsonl"
    with chats.open("w") as f:
        for p in PROMPTS:
            answer = rng.choice(["yes", "no"])
            f.write(
                json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]})
            )
            f.write("\n")
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS))
    start = base / "sft"
    extra = [f"dataset_mixture=[{{path: {chats}}}]", "max_steps=40", "learning_rate=3e-3"]
    done = run_quill(["sft", *sft_argv(start, tiny["pre"], *extra)], tiny["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = {"start": start, "ids": (yes, no)}
    for name, preferred in (("toward_yes", yes), ("toward_no", no)):
        reward = base / f"reward_{name}"
        save_first_token_reward_model(reward, tokenizer, preferred)
        args = rl_argv(
            base / name, start, reward,
            f"dataset_mixture=[{{path: {prompts}}}]", "trust_remote_code=true",
            "learning_rate=3e-3", "per_device_train_batch_size=8", "generation_batch_size=16", "max_steps=12",
            "save_steps=12",
        )  # fmt: skip
        done = run_quill(["rl", *args], tiny["env"])
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = base / name
    return out


def test_rl_on_the_reward_model_moves_the_policy_toward_its_preference(runs):
    yes, no = runs["ids"]
    start, toward_yes, toward_no = (
        first_token_share(runs[k], PROMPTS, yes, no) for k in ("start", "toward_yes", "toward_no")
    )
    assert 0.2 < start < 0.8, start  # the start policy holds both answers
    assert toward_yes > start + 0.05 and toward_no < start - 0.05, (start, toward_yes, toward_no)
    log = json.loads((runs["toward_yes"] / "training_log.json").read_text())
    assert any("rewards/reward_model/mean" in row for row in log)
    assert not any("rewards/task_reward/mean" in row for row in log)
