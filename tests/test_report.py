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


def add_metrics(run, stage: str, extra: dict) -> None:
    path = run / stage / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))


def test_statistics_section_marks_significant_gains_only(tmp_path):
    from quill.heldout import paired_metrics

    run = make_run(tmp_path / "run")
    rows = [{"task": "chain_sum"}] * 600 + [{"task": "word_sequence_reversal"}] * 600
    base = [1] * 400 + [0] * 800
    gained = base[:]  # RL: 90 prompts wrong -> right, 10 right -> wrong: a gain
    for i in range(400, 490):
        gained[i] = 1
    for i in range(10):
        gained[i] = 0
    noisy = base[:]  # DPO: +12 net on 1,200 prompts (22 gained, 10 lost): p > 0.05, inside the noise
    for i in range(400, 422):
        noisy[i] = 1
    for i in range(10):
        noisy[i] = 0
    add_metrics(run, "rl", {**paired_metrics(rows, base, gained), "headroom_before": 0.2, "headroom": 0.15,
                            "pass_at_8_before": 0.5, "pass_at_8": 0.55, "sampled_accuracy": 0.4,
                            "sampled_prompts": 300, "sampled_temperature": 1.0, "rm_agreement_auc": 0.55,
                            "rm_used": False, "rm_min_agreement": 0.65,
                            "rm_decision": "reward model not used: within-group AUC 0.550 < 0.65",
                            "groups_with_task_reward_variance": 0.31, "rl_prompts_per_step": 32})  # fmt: skip
    add_metrics(run, "dpo", {**paired_metrics(rows, base, noisy), **paired_metrics(rows, gained, noisy, "vs_control_")})
    text = write_report(run).read_text()
    metrics_table, stats = tables(text)[:2]
    assert not any("_diff" in line or "_p " in line for line in metrics_table)  # comparisons have their own table
    header = cells(stats[0])
    assert header[:3] == ["stage", "compared with", "metric"] and "verdict" in header
    rows_by = {(c[0], c[1], c[2]): dict(zip(header, c)) for c in map(cells, stats[2:])}
    rl = rows_by[("rl", "start model", "task_accuracy")]
    assert rl["verdict"] == "**gain**" and rl["difference"] == "+0.067" and rl["prompts"] == "1,200"
    dpo = rows_by[("dpo", "start model", "task_accuracy")]
    assert dpo["difference"] == "+0.010" and dpo["verdict"] == "no significant change"
    assert float(dpo["p"]) > 0.05
    assert rows_by[("dpo", "next-token control", "task_accuracy")]["verdict"] == "loss"
    assert ("rl", "start model", "chain_sum_accuracy") in rows_by
    assert "used by RL: **no**" in text and "reward model not used" in text and "31.0%" in text
    assert "- pass@8: 0.5 -> 0.55" in text and "- headroom pass@8 - greedy: 0.2 -> 0.15" in text
    assert "Reward during RL" in text and (run / "rl_reward.png").exists()


def test_reward_points_each_average_enough_prompts():
    from quill.tools.report import smooth_by_prompts

    rows = [(5, 0.0), (10, 1.0), (15, 0.5), (20, 0.5)]  # a log row every 5 steps, 4 prompts a step: 20 prompts
    points, window = smooth_by_prompts(rows, prompts_per_step=4, min_prompts=40)
    assert window == 40 and [s for s, _ in points] == [10, 15, 20]
    assert points[0][1] == pytest.approx(0.5) and points[1][1] == pytest.approx(0.75)
    assert smooth_by_prompts(rows, prompts_per_step=4, min_prompts=1000) == ([], 0)
