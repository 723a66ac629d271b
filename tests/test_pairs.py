"""Pairs from a model's own answers (quill.data.pairs) and the reward-model gate of RL (quill.rewards, rl stage).

The policy's answers are planted (model.generate returns chosen texts), so each test knows which answers are the
model's own; the labellers are the task scorer, a planted reward model and a tiny judge language model.
"""

import pytest
import torch
from test_evaluation import make_checkpoint, rl_rows

from quill.data import tasks
from quill.data.pairs import JudgeLabeller, RewardModelLabeller, TaskScorer, build_pairs
from quill.data.tokenizer import END
from quill.errors import QuillError
from quill.loading import load_tokenizer
from quill.metrics import reward_model_scores
from quill.model import QuillForCausalLM, QuillForSequenceClassification
from quill.rewards import ScaledRewardModel, reward_model_agreement, use_reward_model

QUESTIONS = [r["prompt"][0]["content"] for r in rl_rows()]
# Per prompt: the greedy answer, then what sampling returns (cycled). Reference answers: 19, 35, "go, hundred",
# "fox, quick, the".
GREEDY = ["18", "35", "hundred, go", "fox, quick, the"]
SAMPLED = [["19", "20", "18"], ["35", "36"], ["hundred, go"], ["fox, quick, the"]]


def plant_policy(model, tok):
    """model.generate answers greedily with GREEDY and, when sampling, with SAMPLED (cycled)."""

    def generate(input_ids, attention_mask, do_sample=False, num_return_sequences=1, **kwargs):
        rows = []
        for row in input_ids.tolist():
            prompt = tok.decode(row, skip_special_tokens=True)
            i = next(i for i, q in enumerate(QUESTIONS) if q in prompt)
            answers = (
                [SAMPLED[i][j % len(SAMPLED[i])] for j in range(num_return_sequences)] if do_sample else [GREEDY[i]]
            )
            rows += [row + tok(a + END, add_special_tokens=False)["input_ids"] for a in answers]
        width = max(map(len, rows))
        return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])

    model.generate = generate
    return model


def policy(tmp_path):
    folder = make_checkpoint(tmp_path / "policy")
    tok = load_tokenizer(str(folder))
    return plant_policy(QuillForCausalLM.from_pretrained(folder).eval(), tok), tok


def own_answers(i: int) -> set[str]:
    return {GREEDY[i], *SAMPLED[i]}


class PlantedRewardModel(torch.nn.Module):
    """A sequence classifier whose score is looked up from the decoded conversation's last answer."""

    def __init__(self, tok, scores: dict[str, float]):
        super().__init__()
        self.tok, self.scores = tok, scores
        self.config = type("Config", (), {"pad_token_id": tok.pad_token_id})()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for the metric helpers

    def forward(self, input_ids, attention_mask):
        out = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            text = self.tok.decode([t for t, m in zip(row, mask, strict=True) if m], skip_special_tokens=True)
            out.append(next((s for a, s in self.scores.items() if text.rstrip().endswith(a)), 0.0))
        return type("Out", (), {"logits": torch.tensor(out)[:, None]})()


def test_scorer_pairs_put_a_correct_answer_over_the_models_own_wrong_one(tmp_path):
    model, tok = policy(tmp_path)
    rows = rl_rows()
    pairs, stats = build_pairs(model, tok, rows, TaskScorer(), samples=3, batch_size=4)
    by_question = {p["prompt"][0]["content"]: p for p in pairs}
    # Prompt 3: every own answer is correct, so there is nothing to prefer.
    assert set(by_question) == set(QUESTIONS[:3]) and stats.pairs == 3 and stats.prompts == 4
    for i, question in enumerate(QUESTIONS[:3]):
        pair, row = by_question[question], rows[i]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert rejected in own_answers(i)  # the model's own output, never a made-up one
        assert tasks.score(row["task"], chosen, row) == 1.0 > tasks.score(row["task"], rejected, row)
    assert by_question[QUESTIONS[0]]["chosen"][0]["content"] == "19"  # the model's own correct sample
    assert by_question[QUESTIONS[0]]["rejected"][0]["content"] == "18"  # its greedy answer
    assert by_question[QUESTIONS[1]]["rejected"][0]["content"] == "36"  # greedy right: a wrong sample instead
    assert by_question[QUESTIONS[2]]["chosen"][0]["content"] == "go, hundred"  # never sampled: the reference
    assert stats.greedy_correct == 2 and stats.rejected_greedy == 2 and stats.chosen_own == 2
    # Without the reference answer, a prompt the model never answers right gives no pair.
    pairs, _ = build_pairs(model, tok, rows, TaskScorer(), samples=3, use_reference=False)
    assert {p["prompt"][0]["content"] for p in pairs} == set(QUESTIONS[:2])


def test_reward_model_labels_decide_the_pairs(tmp_path):
    model, tok = policy(tmp_path)
    rows = rl_rows()
    # The reward model likes the wrong "20" best and the right "19" least: labels must follow it, not the scorer.
    planted = PlantedRewardModel(tok, {"20": 3.0, "18": 1.0, "19": -2.0, "35": 1.0, "36": 0.5})
    pairs, stats = build_pairs(model, tok, rows[:2], RewardModelLabeller(planted, tok), samples=3)
    first = next(p for p in pairs if p["prompt"][0]["content"] == QUESTIONS[0])
    assert (first["chosen"][0]["content"], first["rejected"][0]["content"]) == ("20", "19")
    second = next(p for p in pairs if p["prompt"][0]["content"] == QUESTIONS[1])
    assert (second["chosen"][0]["content"], second["rejected"][0]["content"]) == ("35", "36")
    assert stats.labeller == "reward_model"


def test_a_tiny_judge_model_labels_pairs_from_its_own_probabilities(tmp_path):
    model, tok = policy(tmp_path)
    rows = rl_rows()
    judge_dir = make_checkpoint(tmp_path / "judge", seed=3)
    judge_tok = load_tokenizer(str(judge_dir))
    judge = JudgeLabeller(QuillForCausalLM.from_pretrained(judge_dir).eval(), judge_tok, batch_size=3)
    pairs, stats = build_pairs(model, tok, rows, judge, samples=3)
    assert stats.labeller == "judge" and pairs

    def p_first(question: str, a: str, b: str) -> float:  # one comparison by hand: P(A) among {A, B}, both orders
        probs = []
        for x, y in ((a, b), (b, a)):
            ids = judge._prompt_ids(question, x, y)
            with torch.no_grad():
                logits = judge.model(torch.tensor([ids])).logits[0, -1, judge.choices]
            probs.append(torch.softmax(logits, -1)[0].item())
        return (probs[0] + 1 - probs[1]) / 2

    for pair in pairs:
        i = QUESTIONS.index(pair["prompt"][0]["content"])
        candidates = list(dict.fromkeys([GREEDY[i], *SAMPLED[i], rows[i]["answer"]]))
        wins = [
            sum(p_first(QUESTIONS[i], a, b) for b in candidates if b != a) / (len(candidates) - 1) for a in candidates
        ]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert rejected in own_answers(i)
        assert abs(wins[candidates.index(chosen)] - max(wins)) < 1e-5
        own = [c for c in candidates if c in own_answers(i)]
        assert abs(wins[candidates.index(rejected)] - min(wins[candidates.index(c)] for c in own)) < 1e-5


def test_agreement_is_the_within_group_auc_and_gates_the_reward_model(tmp_path):
    _, tok = policy(tmp_path)
    rows = rl_rows()[:2]
    samples = [["19", "18", "20"], ["35", "36", "34"]]
    correct = [[1, 0, 0], [1, 0, 0]]
    # Right answers: 19 beats 18 and ties 20 (1.5 of 2); 35 loses to 36 and beats 34 (1 of 2): AUC 2.5 / 4.
    planted = PlantedRewardModel(tok, {"19": 1.0, "18": 0.0, "20": 1.0, "35": 0.5, "36": 2.0, "34": -1.0})
    agreement = reward_model_agreement(planted, tok, rows, samples, correct)
    assert agreement.auc.auc == 0.625 and agreement.auc.pairs == 4 and agreement.auc.groups == 2
    assert agreement.by_slice == {} and "on_slice_rm_agreement_auc" not in agreement.as_metrics()
    # Rows that name a slice get the AUC on it and off it too (here: the first prompt on it, the second off it).
    sliced = [{**rows[0], "slice": "on"}, {**rows[1], "slice": "off"}]
    metrics = reward_model_agreement(planted, tok, sliced, samples, correct).as_metrics()
    assert metrics["on_slice_rm_agreement_auc"] == 0.75 and metrics["off_slice_rm_agreement_auc"] == 0.5
    assert metrics["on_slice_rm_agreement_pairs"] == 2 and metrics["rm_agreement_auc"] == 0.625
    used, why = use_reward_model(agreement, threshold=0.65)
    assert not used and "not used" in why and "verifiable task reward alone" in why and "0.625" in why
    used, why = use_reward_model(agreement, threshold=0.6)
    assert used and why.startswith("reward model used")
    # The scaled reward stays within +-weight whatever the raw score: noise cannot outweigh a right answer (1.0).
    scaled = ScaledRewardModel(planted, tok, agreement.mean, agreement.std, weight=0.2)
    values = scaled([r["prompt"] for r in rows], ["20", "36"])
    assert all(abs(v) < 0.2 for v in values) and values[0] != values[1]


def test_reward_model_scores_are_the_classifiers_scores_of_the_rendered_conversation(tmp_path):
    folder = make_checkpoint(tmp_path / "rm", cls=QuillForSequenceClassification)
    tok = load_tokenizer(str(folder))
    rm = QuillForSequenceClassification.from_pretrained(folder).eval()
    rows = rl_rows()
    answers = ["19", "35 or so", "go, hundred", "the"]
    batched = reward_model_scores(rm, tok, [r["prompt"] for r in rows], answers, batch_size=3)
    for row, answer, score in zip(rows, answers, batched, strict=True):  # one at a time, no padding
        text = tok.apply_chat_template(row["prompt"] + [{"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            alone = rm(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, 0].item()
        assert abs(alone - score) < 1e-4


def test_rl_falls_back_to_the_verifiable_reward_below_the_agreement_threshold(tmp_path, capsys):
    from quill.arguments import ModelArguments
    from quill.rewards import TaskReward
    from quill.stages.rl import RLConfig, reward_functions

    folder = make_checkpoint(tmp_path / "rm", cls=QuillForSequenceClassification)
    tok = load_tokenizer(str(folder))
    rows = rl_rows()
    samples = [
        ["19", "18", "20"],
        ["35", "36", "3"],
        ["go, hundred", "hundred, go", "go"],
        ["fox, quick, the", "x", "y"],
    ]
    start = {"_samples": samples, "_sample_correct": [[1, 0, 0]] * 4}
    rm = QuillForSequenceClassification.from_pretrained(folder).eval()
    auc = reward_model_agreement(rm, tok, rows, samples, start["_sample_correct"]).auc.auc

    def config(threshold: float) -> RLConfig:
        return RLConfig(
            output_dir=str(tmp_path / "out"),
            reward_model_path=str(folder),
            reward_model_min_agreement=threshold,
            scale_rewards="batch",
            num_generations=2,
            per_device_train_batch_size=2,
            use_cpu=True,
            report_to=[],
        )

    funcs, info = reward_functions(config(min(1.0, auc + 0.01)), ModelArguments(), start, rows)
    assert [type(f) for f in funcs] == [TaskReward] and info["rm_used"] is False
    assert info["rm_agreement_auc"] == pytest.approx(auc)
    said = capsys.readouterr().err
    assert "reward model not used" in said and "verifiable task reward alone" in said
    funcs, info = reward_functions(config(max(0.0, auc - 0.01)), ModelArguments(), start, rows)
    assert [type(f) for f in funcs] == [TaskReward, ScaledRewardModel] and info["rm_used"] is True
    assert "reward model used" in capsys.readouterr().err
    with pytest.raises(QuillError, match="scale_rewards 'group'"):
        RLConfig(output_dir=str(tmp_path / "o"), reward_model_path=str(folder), scale_rewards="group", use_cpu=True)
    # null: RLHF on prompts no scorer grades (gpt2-124m's ultrafeedback) uses the reward model unchecked, and says so.
    funcs, info = reward_functions(config(None), ModelArguments(), start, rows)
    assert [type(f) for f in funcs] == [TaskReward, ScaledRewardModel] and info["rm_used"] is True
    assert "without an agreement check" in capsys.readouterr().err


def test_policy_pairs_scored_by_the_task_scorer_need_prompts_with_answers():
    from datasets import Dataset

    from quill.data.pairs import PolicyPairArguments, policy_pairs

    preference = Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(QuillError, match="needs prompt rows with task and answer columns"):
        policy_pairs("dpo", None, None, {"train": preference, "eval": preference}, PolicyPairArguments())


def test_learnable_prompts_are_those_the_policy_answers_right_sometimes(tmp_path):
    from quill.rewards import learnable_prompts

    model, tok = policy(tmp_path)
    # Sampled answers (see SAMPLED): 19 is right 1 in 3, 35 is right 2 in 3, "hundred, go" never, the last always.
    keep, share = learnable_prompts(model, tok, rl_rows(), samples=3, temperature=1.0, max_new_tokens=8, seed=0)
    assert keep == [0, 1] and share == 0.5
