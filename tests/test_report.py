"""`quill report` on a fake finished run: stage folders with metrics.json / training_log.json as run_stage writes
them."""

import json
import sys

import pytest

from quill import cli
from quill.output import MARKER
from quill.tools.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COST = {
    "train_steps": 10,
    "wall_seconds": 12.5,
    "train_runtime": 11.0,
    "tokens_seen": 20480,
    "world_size": 1,
    "device": "cpu",
    "tokens_per_second": 1861.8,
    "peak_memory_mb": 812.3,
}
# What each stage's evaluate() returns, as run_stage stores it: before training (`_before`) and after.
EVAL = {
    "pretrain": {"eval_loss": (8.31, 3.12), "eval_perplexity": (4064.0, 22.6)},
    "sft": {"task_accuracy": (0.0, 0.41), "chain_sum_accuracy": (0.0, 0.5)},
    "dpo": {"dpo_reward_accuracy": (0.0, 0.83), "dpo_reward_margin": (0.0, 0.7), "task_accuracy": (0.41, 0.44)},
    "reward": {"preference_accuracy": (0.52, 0.9), "reward_margin": (0.01, 2.3)},
    "rl": {"task_accuracy": (0.41, 0.55)},
}


@pytest.fixture(autouse=True)
def keep_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI rewrites sys.argv for the tool it runs


def stage_log(stage: str) -> list[dict]:
    rows = []
    for step in range(1, 11):
        row = {"loss": 5.0 / step, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": step / 10, "step": step}
        if stage == "rl":  # GRPOTrainer's logged rewards
            row.update(
                {
                    "reward": 0.1 * step,
                    "reward_std": 0.2,
                    "rewards/task_reward/mean": 0.1 * step,
                    "rewards/task_reward/std": 0.2,
                }
            )
        rows.append(row)
    rows.append({"train_runtime": 11.0, "train_loss": 1.5, "epoch": 1.0, "step": 10})
    return rows


def make_run(root, stages=tuple(EVAL), recipe: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "metrics.json").write_text(json.dumps({"vocab_size": 4096, "bytes_per_token": 3.4}))
    (root / "tokenizer" / MARKER).write_text(json.dumps({"done": True, "stage": "tokenizer"}))
    for stage in stages:
        folder = root / stage
        folder.mkdir()
        metrics = {f"{k}_before": before for k, (before, _) in EVAL[stage].items()}
        metrics.update({k: after for k, (_, after) in EVAL[stage].items()})
        metrics.update(COST, train_loss=1.5)
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "training_log.json").write_text(json.dumps(stage_log(stage)))
        (folder / MARKER).write_text(json.dumps({"done": True, "stage": stage}))
    if recipe:  # the run record, as quill.runner writes it
        (root / "quill_run.json").write_text(
            json.dumps(
                {
                    "name": "tiny",
                    "recipe": "/recipes/tiny",
                    "started_at": "2026-11-30T10:00:00+00:00",
                    "recipe_yaml": "name: tiny\nstages:\n  - {name: pretrain, config: pretrain.yaml}\n",
                    "overrides": ["pretrain.max_steps=5"],
                    "stages": [{"name": "pretrain", "status": "ran", "config": "learning_rate: 3.0e-3\n"}],
                }
            )
        )
    return root


def tables(text: str) -> list[list[str]]:
    """Markdown tables in `text`, each as its list of lines."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_has_one_table_with_every_stage_and_valid_plots(tmp_path):
    run = make_run(tmp_path / "run")
    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text()

    [table] = tables(text)  # exactly one table
    header = cells(table[0])
    assert header == ["metric", "tokenizer", "pretrain", "sft", "dpo", "reward", "rl"]
    rows = {cells(line)[0]: dict(zip(header[1:], cells(line)[1:])) for line in table[2:]}
    # Each stage's gain is visible: the before row sits right above the after row.
    names = list(rows)
    assert names.index("task_accuracy_before") + 1 == names.index("task_accuracy")
    assert rows["task_accuracy_before"]["rl"] == "0.41" and rows["task_accuracy"]["rl"] == "0.55"
    assert rows["eval_loss"]["pretrain"] == "3.12" and rows["eval_loss"]["sft"] == "—"
    assert rows["preference_accuracy"]["reward"] == "0.9"
    assert rows["bytes_per_token"]["tokenizer"] == "3.4"
    for key in ("wall_seconds", "tokens_seen", "tokens_per_second", "peak_memory_mb", "device", "world_size"):
        assert rows[key]["sft"] != "—", key
    assert rows["tokens_seen"]["rl"] == "20,480"

    for section in (
        "## Hardware",
        "CPU cores",
        "## Versions",
        "- torch:",
        "- transformers:",
        "- trl:",
        "- peft:",
        "- datasets:",
        "- accelerate:",
        "- python:",
        "## Recipe",
        "name: tiny",
        "`pretrain.max_steps=5`",
        "learning_rate: 3.0e-3",
    ):
        assert section in text, section
    for png in ("training_loss.png", "eval_metrics.png", "rl_reward.png"):
        data = (run / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, png
        assert f"]({png})" in text


def test_report_copes_with_missing_stages(tmp_path, capsys):
    run = make_run(tmp_path / "run", stages=("pretrain",), recipe=False)
    cli.main(["report", str(run)])  # the `quill report` entry point
    assert capsys.readouterr().out.strip() == str(run / "report.md")
    text = (run / "report.md").read_text()
    [table] = tables(text)
    assert cells(table[0]) == ["metric", "tokenizer", "pretrain"]
    assert "not run: sft, dpo, reward, rl" in text and "No `quill_run.json`" in text
    assert (run / "training_loss.png").exists() and (run / "eval_metrics.png").exists()
    assert not (run / "rl_reward.png").exists() and "rl_reward.png" not in text


def test_report_on_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run folder") and "\n" not in err
