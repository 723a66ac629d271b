"""`quill eval` and the metric functions the stages call: numbers checked against planted answers and by hand."""

import json
import math
import shutil
import sys

import pytest
import torch
from tiny_model import save_checkpoint

from quill import cli
from quill import metrics as evaluation
from quill.data import tasks
from quill.data.tokenizer import END, train_tokenizer
from quill.loading import load_tokenizer
from quill.model import QuillForCausalLM, QuillForSequenceClassification
from quill.output import MARKER
from quill.tools import eval as eval_tool

# Held-out items with known answers, one question space per task.
ITEMS = {
    "chain_sum": [
        {
            "question": "State the final answer to the following arithmetic problem: 12 + 7 =",
            "answer": "19",
            "metadata": {},
        },
        {
            "question": "State the final answer to the following arithmetic problem: 40 - 8 + 3 =",
            "answer": "35",
            "metadata": {},
        },
    ],
    "word_sequence_reversal": [
        {"question": "Reverse this list of words: hundred, go", "answer": "go, hundred", "metadata": {}},
        {"question": "Reverse this list of words: the, quick, fox", "answer": "fox, quick, the", "metadata": {}},
    ],
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 12 + 7 = 19 are easy.",
    "Return the list reversed, word by word — naïve café.",
]


def rl_rows() -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": i["question"]}],
            "task": task,
            "answer": i["answer"],
            "metadata": json.dumps(i["metadata"]),
        }
        for task, items in ITEMS.items()
        for i in items
    ]


def dpo_pairs() -> list[dict]:
    return [
        {
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": r["answer"]}],
            "rejected": [{"role": "assistant", "content": r["answer"][::-1]}],
            "task": r["task"],
        }
        for r in rl_rows()
    ]


def tiny_tokenizer():
    corpus = [f"{i['question']} {i['answer']}" for items in ITEMS.values() for i in items] * 5 + TEXTS * 5
    return train_tokenizer(corpus, vocab_size=400)


def make_checkpoint(path, seed: int = 0, cls=QuillForCausalLM):
    """A tiny Quill folder, saved the way a stage saves it (weights, config, tokenizer, chat template)."""
    labels = {"num_labels": 1} if cls is QuillForSequenceClassification else {}
    tok = tiny_tokenizer()
    save_checkpoint(path, seed, cls, tokenizer=tok, vocab_size=-(-len(tok) // 64) * 64, **labels)
    return path


def write_eval_data(folder):
    folder.mkdir(parents=True, exist_ok=True)
    files = {"pretrain_eval": [{"text": t} for t in TEXTS], "rl_eval": rl_rows(), "dpo_eval": dpo_pairs()}
    for name, rows in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "sft")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_eval_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def loaded(ckpt):
    tok = load_tokenizer(str(ckpt))
    return QuillForCausalLM.from_pretrained(ckpt).eval(), tok


def plant(model, tok, answers: dict[str, str]):
    """Make `model.generate` answer each question with a planted completion (then junk after the stop token)."""

    def generate(input_ids, attention_mask, **kwargs):
        rows = []
        for row in input_ids.tolist():
            prompt = tok.decode(row, skip_special_tokens=True)
            text = next(a for q, a in answers.items() if q in prompt) + END + "ignored after the end of turn"
            rows.append(row + tok(text, add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])

    model.generate = generate
    return model


def test_task_accuracy_scores_planted_answers_with_the_task_scorer(ckpt):
    tok = load_tokenizer(str(ckpt))
    model = QuillForCausalLM.from_pretrained(ckpt).eval()
    rows = rl_rows()
    # 3 of 4 right: chain_sum 1/2 (partial credit from the scorer does not count as correct), reversal 2/2.
    planted = {
        rows[0]["prompt"][0]["content"]: "19",
        rows[1]["prompt"][0]["content"]: "35 is the answer, I think",
        rows[2]["prompt"][0]["content"]: "go, hundred",
        rows[3]["prompt"][0]["content"]: " fox, quick, the",
    }
    plant(model, tok, planted)
    metrics = evaluation.task_accuracy(model, tok, rows, batch_size=3)
    assert metrics == {"task_accuracy": 0.75, "chain_sum_accuracy": 0.5, "word_sequence_reversal_accuracy": 1.0}

    # Mean reward keeps reasoning-gym's partial credit; it must equal the scorer applied by hand.
    expected = [tasks.score(r["task"], planted[r["prompt"][0]["content"]], r) for r in rows]
    assert 0 < expected[1] < 1
    completions = evaluation.generate_completions(model, tok, [r["prompt"] for r in rows])
    assert evaluation.reward_metrics(rows, completions)["mean_reward"] == pytest.approx(sum(expected) / 4)


def test_heldout_loss_matches_a_manual_computation(loaded):
    model, tok = loaded
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:  # one text at a time, no padding: BOS + the text's tokens, every text token scored
            ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
            logits = model(ids).logits[0, :-1]
            nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n_bytes += len(text.encode("utf-8"))
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    metrics = evaluation.heldout_loss(model, tok, TEXTS, batch_size=2)  # batched: padding must not count
    assert metrics["eval_loss"] == pytest.approx(nats / n_tokens, rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4)
    # Short windows score every token once too (with less context): same count, finite, same ballpark.
    windowed = evaluation.heldout_loss(model, tok, TEXTS, max_length=5)
    assert math.isfinite(windowed["eval_loss"]) and abs(windowed["eval_loss"] - metrics["eval_loss"]) < 1.0


def test_preference_metrics_match_unbatched_scores(ckpt, loaded, tmp_path):
    """DPO's implicit-reward accuracy and a reward model's ranking, as TRL's trainers evaluate them (what the dpo and
    reward stages record and `quill eval` prints), equal log-probabilities and scores computed by hand, one unpadded
    sequence at a time. Batches of 2 over 4 pairs: TRL averages batch means, exact when the batches are equal."""
    policy, tok = loaded
    pairs = dpo_pairs()
    start = QuillForCausalLM.from_pretrained(ckpt).eval()  # the same weights as the policy: no reward yet
    same = evaluation.preference_accuracy(policy, tok, pairs, reference=start, batch_size=2)
    assert same == {"dpo_reward_accuracy": 0.0, "dpo_reward_margin": 0.0}

    reference = QuillForCausalLM.from_pretrained(make_checkpoint(tmp_path / "ref", seed=1)).eval()
    metrics = evaluation.preference_accuracy(policy, tok, pairs, reference=reference, beta=0.5, batch_size=2)

    def split(pair, side):
        """(prompt ids, answer ids) by hand: the chat template renders the prompt (with the assistant's opening) and
        the whole conversation; the answer is every token of the conversation after the prompt's."""
        prompt = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        whole = tok.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
        assert whole.startswith(prompt)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(whole, add_special_tokens=False)["input_ids"]
        assert ids[: len(p)] == p
        assert tok.decode(ids[len(p) :]) == pair[side][0]["content"] + END + "\n"  # the answer and its end of turn
        return p, ids[len(p) :]

    def logp(model, prompt, answer):
        """log p(answer | prompt) with plain torch: one sequence, no padding; token t is scored by the log-softmax
        of the logits at position t - 1."""
        ids = prompt + answer
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(len(prompt), len(ids)))

    chosen, rejected = ([split(x, side) for x in pairs] for side in ("chosen", "rejected"))
    margins = [
        0.5 * (logp(policy, *c) - logp(reference, *c) - logp(policy, *r) + logp(reference, *r))
        for c, r in zip(chosen, rejected, strict=True)
    ]
    assert 0 < sum(m > 0 for m in margins) < 4  # the check below can tell a right count from a wrong one
    assert metrics["dpo_reward_margin"] == pytest.approx(sum(margins) / 4, rel=1e-4, abs=1e-5)
    assert metrics["dpo_reward_accuracy"] == sum(m > 0 for m in margins) / 4

    rm = QuillForSequenceClassification.from_pretrained(
        make_checkpoint(tmp_path / "rm", cls=QuillForSequenceClassification)
    )
    scores = {}
    for side in ("chosen", "rejected"):
        texts = [tok.apply_chat_template(x["prompt"] + x[side], tokenize=False) for x in pairs]
        with torch.no_grad():
            scores[side] = [
                rm(torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])).logits[0, 0].item() for t in texts
            ]
    result = evaluation.preference_accuracy(rm, tok, pairs, batch_size=2)
    expected = sum(c > r for c, r in zip(scores["chosen"], scores["rejected"])) / 4
    assert result["preference_accuracy"] == expected
    assert result["reward_margin"] == pytest.approx(sum(scores["chosen"]) / 4 - sum(scores["rejected"]) / 4, abs=1e-5)


def test_quill_eval_cli_prints_and_saves_metrics(ckpt, data_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI rewrites sys.argv for the tool it runs
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in ckpt.iterdir())
    # The `quill` console script's entry point, in-process (a subprocess would spend ~10 s importing torch).
    cli.main(["eval", str(ckpt), "--data-dir", str(data_dir), "--max-new-tokens", "4"])
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in ckpt.iterdir()) == before  # the model folder is left as it was
    saved = json.loads((tmp_path / "eval_results" / f"{ckpt.name}.json").read_text())
    metrics = saved["metrics"]
    assert set(metrics) == {
        "eval_loss",
        "bits_per_byte",
        "task_accuracy",
        "chain_sum_accuracy",
        "word_sequence_reversal_accuracy",
    }
    assert all(math.isfinite(v) for v in metrics.values())
    for key, value in metrics.items():  # the printed table shows the same numbers
        assert f"{key}" in stdout and f"{value:.4f}" in stdout


def test_eval_detects_dpo_stage_and_reward_models(ckpt, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "sft")
    shutil.copytree(ckpt, run / "dpo")
    # A DPO stage folder as finish_stage leaves it: its marker names the base model (where the run saw it).
    (run / "dpo" / MARKER).write_text(json.dumps({"done": True, "stage": "dpo", "base_model": "outputs/elsewhere/sft"}))
    metrics = eval_tool.evaluate_model(run / "dpo", data_dir=data_dir, limit=2, max_new_tokens=2)
    assert metrics["dpo_reward_accuracy"] == 0.0  # the sibling sft/ is the reference, and it is the same model

    rm_dir = make_checkpoint(tmp_path / "reward", cls=QuillForSequenceClassification)
    out = tmp_path / "rm.json"
    eval_tool.main([str(rm_dir), "--data-dir", str(data_dir), "--output", str(out)])
    assert set(json.loads(out.read_text())["metrics"]) == {"preference_accuracy", "reward_margin"}
    assert "preference_accuracy" in capsys.readouterr().out


def test_eval_works_on_a_llama_checkpoint(tmp_path, data_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    metrics = eval_tool.evaluate_model(tmp_path / "llama", data_dir=data_dir, max_new_tokens=3)
    assert {"eval_loss", "bits_per_byte", "task_accuracy"} <= set(metrics)
    assert math.isfinite(metrics["eval_loss"]) and 0 <= metrics["task_accuracy"] <= 1


def test_eval_errors_are_one_line(tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_tool.main([str(tmp_path / "missing"), "--data-dir", str(data_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model") and "no config.json" in err and "\n" not in err
