"""`quill eval DIR --lm-eval TASKS` runs lm-evaluation-harness offline on a task of our own (a YAML over a local
jsonl) and reports the accuracy computed here by hand from the model's log-probabilities; on a stage folder of a run
the result lands in OUT/eval/<stage>.json and `quill report` shows it as a row of that stage."""

import json

import pytest
import torch
from tiny_model import save_checkpoint
from tiny_outputs import run_quill, stage_env

pytest.importorskip("lm_eval", reason="the lm-eval extra (pip install quill[lm-eval]) is not installed")

QUESTIONS = [
    ("the quick brown", ["fox", "dog", "lazy"], 0),
    ("the quick brown", ["fox", "dog", "lazy"], 1),
    ("the lazy", ["dog", "fox"], 0),
    ("what is two plus", ["two", "four"], 1),
    ("jumps over the", ["lazy", "quick", "brown"], 2),
]
TASK = """task: quill_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def hand_accuracy(folder) -> float:
    """The harness's rule: the choice with the highest log p(" " + choice | question) wins; the question is
    tokenized as the tokenizer does by default (with <|bos|>) and the choice is what the whole adds to it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    right = 0
    for question, choices, answer in QUESTIONS:
        scores = []
        for choice in choices:
            context, whole = tokenizer(question)["input_ids"], tokenizer(f"{question} {choice}")["input_ids"]
            with torch.no_grad():
                logps = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logps[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += max(range(len(choices)), key=scores.__getitem__) == answer
    return right / len(QUESTIONS)


def test_lm_eval_on_a_local_task_matches_the_hand_computed_accuracy_and_reaches_the_report(tmp_path):
    run_dir = tmp_path / "run"
    stage = run_dir / "sft"
    save_checkpoint(stage)  # a Quill folder (its own code; loaded here with trust_remote_code)
    (stage / "quill_stage.json").write_text(json.dumps({"stage": "sft", "done": True}))
    (stage / "metrics.json").write_text(json.dumps({"task_accuracy": 0.5}))
    (run_dir / "quill_run.json").write_text("{}")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tasks / "quill_mc.yaml").write_text(TASK.format(data=data))

    args = ["eval", str(stage), "--lm-eval", "quill_mc", "--lm-eval-include", str(tasks), "--lm-eval-only"]
    done = run_quill([*args, "--trust-remote-code"], stage_env(tmp_path), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((run_dir / "eval" / "sft.json").read_text())["metrics"]
    expected = hand_accuracy(stage)
    assert 0 < expected < 1  # a score that could be wrong either way
    assert saved["lm_eval/quill_mc/acc"] == pytest.approx(expected)

    done = run_quill(["report", str(run_dir)], stage_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in (run_dir / "report.md").read_text().splitlines() if "lm_eval/quill_mc/acc " in line)
    assert [c.strip() for c in row.strip("|").split("|")] == ["lm_eval/quill_mc/acc", f"{expected:.4g}"], row


def test_lm_eval_options_are_checked(tmp_path):
    env = stage_env(tmp_path)
    done = run_quill(["eval", str(tmp_path), "--lm-eval-only"], env, cwd=tmp_path)
    assert done.returncode == 2 and "go with --lm-eval" in done.stderr, done.stderr
