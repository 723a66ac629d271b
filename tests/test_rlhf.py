"""The RLHF branch's RL optimises the reward model's score. The start policy holds two behaviours (trained to
answer "A" or "B" at random, one token each); a planted reward model whose preference is known exactly (1 for
answers that start with one of them, tests/planted_reward.py) then moves GRPO, with the verifiable reward off, toward
that answer, and a run on the opposite preference moves it the other way: the direction comes from the reward model
alone."""

import json
import random

import pytest
import torch
from planted_reward import save_first_token_reward_model
from tiny_outputs import rl_argv, run_quill, sft_argv

from quill.metrics import prompt_ids, reward_model_scores

PROMPTS = [f"question {i}: {word} A or B?" for i in range(64) for word in ("pick", "choose")]
ANSWERS = ("A", "B")  # single tokens of any byte-level vocabulary: the first token is the whole answer


def first_token_probs(model_dir, prompts: list, a: int, b: int) -> tuple[float, float]:
    """(mean P(A) / (P(A) + P(B)), mean P(A) + P(B)) for the first token of the policy's answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shares, mass = [], []
    with torch.no_grad():
        for p in prompts:
            chat = [{"role": "user", "content": p}]  # as the policy is asked: through the chat template
            probs = model(torch.tensor([prompt_ids(tokenizer, chat)])).logits[0, -1].softmax(-1)
            shares.append((probs[a] / (probs[a] + probs[b])).item())
            mass.append((probs[a] + probs[b]).item())
    return sum(shares) / len(shares), sum(mass) / len(mass)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tmp_path_factory.mktemp("rlhf")
    tokenizer = AutoTokenizer.from_pretrained(tiny["tok"])
    ids = [tokenizer.encode(answer, add_special_tokens=False) for answer in ANSWERS]
    assert all(len(i) == 1 for i in ids) and ids[0] != ids[1], ids
    (a,), (b,) = ids
    rng = random.Random(0)
    chats, prompts = base / "a_or_b.jsonl", base / "prompts.jsonl"
    with chats.open("w") as f:
        for p in PROMPTS:
            answer = rng.choice(ANSWERS)
            messages = [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS))
    start = base / "sft"
    extra = [f"dataset_mixture=[{{path: {chats}}}]", "max_steps=120", "learning_rate=3e-3", "task_eval_limit=0"]
    done = run_quill(["sft", *sft_argv(start, tiny["pre"], *extra)], tiny["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = {"start": start, "ids": (a, b), "scores": {}}
    for name, preferred in (("toward_a", a), ("toward_b", b)):
        reward = base / f"reward_{name}"
        save_first_token_reward_model(reward, tokenizer, preferred)
        # What the RL stage will see: the planted model's score of each answer, rendered as RL renders it.
        planted = AutoModelForSequenceClassification.from_pretrained(reward, trust_remote_code=True)
        question = [{"role": "user", "content": PROMPTS[0]}]
        out["scores"][name] = reward_model_scores(planted, tokenizer, [question] * 2, list(ANSWERS))
        args = rl_argv(
            base / name, start, reward,
            f"dataset_mixture=[{{path: {prompts}}}]", "trust_remote_code=true", "task_eval_limit=0",
            "learning_rate=3e-3", "per_device_train_batch_size=8", "generation_batch_size=16", "max_steps=16",
            "save_steps=16",
        )  # fmt: skip
        done = run_quill(["rl", *args], tiny["env"])
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = base / name
    return out


def test_the_planted_reward_model_scores_as_planted(runs):
    assert runs["scores"] == {"toward_a": [1.0, 0.0], "toward_b": [0.0, 1.0]}


def test_rl_on_the_reward_model_moves_the_policy_toward_its_preference(runs):
    a, b = runs["ids"]
    (start, mass), (toward_a, _), (toward_b, _) = (
        first_token_probs(runs[k], PROMPTS, a, b) for k in ("start", "toward_a", "toward_b")
    )
    print(f"P(A) share: start {start:.3f} (P(A) + P(B) {mass:.3f}), toward A {toward_a:.3f}, toward B {toward_b:.3f}")
    assert mass > 0.5 and 0.2 < start < 0.8, (mass, start)  # the start policy answers A or B, and holds both
    assert toward_a > start + 0.1 and toward_b < start - 0.1, (start, toward_a, toward_b)
    log = json.loads((runs["toward_a"] / "training_log.json").read_text())
    assert any("rewards/reward_model/mean" in row for row in log)
    assert not any("rewards/task_reward/mean" in row for row in log)
