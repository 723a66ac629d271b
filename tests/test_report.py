"""`quill report` on a fake finished run: stage folders with metrics.json / training_log.json / the marker as
run_stage writes them, and the run record as quill.runner writes it."""

import json
import math
import sys

import pytest

from quill import cli
from quill.heldout import paired_metrics
from quill.metrics import accuracy_metrics
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
# What each stage's evaluate() returns besides accuracy, as run_stage stores it: before training (`_before`) and after.
EVAL = {
    "pretrain": {"eval_loss": (8.31, 3.12), "eval_perplexity": (4064.0, 22.6)},
    "sft": {"eval_loss": (3.3, 0.9)},
    "dpo": {"dpo_reward_accuracy": (0.0, 0.83), "dpo_reward_margin": (0.0, 0.7), "pairs_prompts": (900, 900)},
    "reward": {
        "preference_accuracy": (0.52, 0.9),
        "pairs_prompts": (900, 900),
        "rm_agreement_auc": (0.46, 0.61),
        "rm_agreement_auc_low": (0.39, 0.55),
        "rm_agreement_auc_high": (0.53, 0.67),
        "rm_agreement_pairs": (908, 908),
        "rm_agreement_prompts": (94, 94),
        "on_slice_rm_agreement_auc": (0.5, 0.8),
        "on_slice_rm_agreement_auc_low": (0.4, 0.7),
        "on_slice_rm_agreement_auc_high": (0.6, 0.9),
        "off_slice_rm_agreement_auc": (0.45, 0.52),
        "off_slice_rm_agreement_auc_low": (0.38, 0.44),
        "off_slice_rm_agreement_auc_high": (0.52, 0.6),
    },
    "rl": {"headroom": (0.2, 0.15), "pass_at_8": (0.5, 0.55), "sampled_prompts": (300, 300)},
    "rlvr": {},
}
KIND = {"rlvr": "rl"}  # rlvr runs the rl stage (`stage: rl` in the recipe): its marker says so
DEMONSTRATOR = {"task": "number_sorting", "slice": "descending", "mistake": "ascending", "rate": 0.7}
# Held-out prompts: 300 on the demonstrator's slice (descending number_sorting), 900 off it.
ROWS = (
    [{"task": "number_sorting", "slice": "on"}] * 300
    + [{"task": "number_sorting", "slice": "off"}] * 300
    + [{"task": "word_sequence_reversal", "slice": "off"}] * 600
)


def answers(on: int, off: int) -> list[int]:
    """Per-prompt correctness: the first `on` prompts of the slice right, and the first `off` of the others."""
    return [int(i < on) for i in range(300)] + [int(i < off) for i in range(900)]


# Each policy stage's answers and the model it starts from: DPO and RL fix the slice, RLVR barely moves.
CORRECT = {
    "pretrain": answers(0, 0),
    "sft": answers(60, 450),
    "dpo": answers(150, 455),
    "control": answers(62, 452),
    "rl": answers(200, 460),
    "rlvr": answers(65, 450),
}
START = {"sft": "pretrain", "dpo": "sft", "rl": "sft", "rlvr": "sft"}


@pytest.fixture(autouse=True)
def keep_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI rewrites sys.argv for the tool it runs


def stage_log(stage: str, rows: int = 10) -> list[dict]:
    log = []
    for step in range(1, rows + 1):
        row = {"loss": 5.0 / step, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": step / rows, "step": step}
        if KIND.get(stage, stage) == "rl":  # GRPOTrainer's logged rewards
            row.update({"reward": 0.01 * step, "reward_std": 0.2, "rewards/task_reward/mean": 0.01 * step})
            row["rewards/task_reward/std"] = 0.2
        if stage == "dpo":  # DPOTrainer's
            row.update({"rewards/margins": 0.1 * step, "rewards/accuracies": 0.5})
        if stage == "reward":  # RewardTrainer's
            row.update({"accuracy": min(1.0, 0.5 + 0.01 * step), "margin": 0.1 * step})
        log.append(row)
    return log + [{"train_runtime": 11.0, "train_loss": 1.5, "epoch": 1.0, "step": rows}]


def stage_metrics(stage: str) -> dict:
    metrics = {f"{k}_before": before for k, (before, _) in EVAL[stage].items()}
    metrics.update({k: after for k, (_, after) in EVAL[stage].items()})
    if stage in START:  # held-out accuracy, paired against the start model (quill.heldout)
        metrics.update({f"{k}_before": v for k, v in accuracy_metrics(ROWS, CORRECT[START[stage]]).items()})
        metrics.update(accuracy_metrics(ROWS, CORRECT[stage]))
        metrics.update(paired_metrics(ROWS, CORRECT[START[stage]], CORRECT[stage]))
    if stage == "dpo":
        metrics.update(paired_metrics(ROWS, CORRECT["control"], CORRECT["dpo"], "vs_control_"))
    if stage == "rl":
        metrics.update({"rm_agreement_auc": 0.55, "rm_used": False, "rm_min_agreement": 0.6, "sampled_accuracy": 0.4})
        metrics.update(
            {"rm_decision": "reward model not used: within-group AUC 0.550 < 0.6", "sampled_temperature": 1.0}
        )
        metrics.update({"groups_with_task_reward_variance": 0.31, "rl_prompts_per_step": 32})
    return {**metrics, **COST, "train_loss": 1.5}


def make_run(root, stages=tuple(EVAL), recipe: bool = True, demonstrator: dict | None = DEMONSTRATOR, log_rows=10):
    """A finished run; `demonstrator` is what the stages' markers recorded (None: old markers without arguments)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "metrics.json").write_text(json.dumps({"vocab_size": 4096, "bytes_per_token": 3.4}))
    (root / "tokenizer" / MARKER).write_text(json.dumps({"done": True, "stage": "tokenizer"}))
    for stage in stages:
        folder = root / stage
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(stage_metrics(stage)))
        (folder / "training_log.json").write_text(json.dumps(stage_log(stage, log_rows)))
        marker = {"done": True, "stage": KIND.get(stage, stage)}
        if demonstrator is not None:
            marker["fingerprint"] = {"sources": {}, "settings": {"demonstrator": demonstrator, "seed": 0}}
        (folder / MARKER).write_text(json.dumps(marker))
    if recipe:  # the run record, as quill.runner writes it
        (root / "quill_run.json").write_text(
            json.dumps(
                {
                    "name": "tiny",
                    "recipe": "/recipes/tiny",
                    "started_at": "2026-11-30T10:00:00+00:00",
                    "recipe_yaml": "name: tiny\nstages:\n  - {name: pretrain, config: pretrain.yaml}\n"
                    "  - {name: rl, config: rl.yaml}\n  - {name: rlvr, config: rlvr.yaml, stage: rl}\n",
                    "overrides": ["pretrain.max_steps=5"],
                    "stages": [
                        {"name": "pretrain", "status": "ran", "seconds": 40.5, "config": "learning_rate: 3.0e-3\n"}
                    ],
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


def rows_of(table: list[str]) -> dict[str, dict[str, str]]:
    header = cells(table[0])
    return {cells(line)[0]: dict(zip(header, cells(line))) for line in table[2:]}


def section(text: str, title: str) -> str:
    """The text of the `## title` section, up to the next `## `."""
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_report_leads_with_what_each_stage_changed(tmp_path):
    run = make_run(tmp_path / "run")
    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text()

    # The stages' time: pretrain's process as the run record timed it (40.5 s), the other five policy and reward
    # stages by their own clocks (12.5 s each; the run record has no entry for them), the tokenizer none.
    assert "Stage time 103 s (the stages' processes, summed), " in text
    # The first thing after the title and the run's one-line summary is the lead table.
    assert text.index("## What each stage changed") < text.index("|") < text.index("## Plots")
    lead = tables(text)[0]
    assert cells(lead[0]) == ["stage", "measured", "all held-out prompts", "on the slice", "off the slice"]
    rows = rows_of(lead)
    assert list(rows) == ["tokenizer", "pretrain", "sft", "dpo", "dpo vs control", "reward", "rl", "rlvr"]
    # One row per policy stage, paired against its start model, overall and on / off the slice.
    sft = rows["sft"]
    assert sft["on the slice"].startswith("0.000 → 0.200: +0.200 [") and sft["on the slice"].endswith("**gain**")
    assert sft["all held-out prompts"].startswith("0.000 → 0.425: +0.425 [")
    dpo = rows["dpo"]
    assert dpo["on the slice"].startswith("0.200 → 0.500: +0.300 [") and dpo["on the slice"].endswith("**gain**")
    assert dpo["off the slice"].startswith("0.500 → 0.506: +0.006 [")
    assert dpo["off the slice"].endswith("p 0.0625, no significant change")  # 5 gained, 0 lost: not enough
    assert rows["dpo vs control"]["on the slice"].startswith("0.207 → 0.500: +0.293 [")
    assert rows["rl"]["on the slice"].startswith("0.200 → 0.667: +0.467 [")
    assert "reward model used: no (AUC 0.550)" in rows["rl"]["measured"]
    assert (
        rows["rlvr"]["off the slice"].startswith("0.500 → 0.500: +0.000 [")
        and "reward model" not in rows["rlvr"]["measured"]
    )
    # Other stages: the number each is judged by.
    assert rows["reward"]["all held-out prompts"] == "0.46 → 0.61 [0.550, 0.670], above chance"
    assert rows["reward"]["on the slice"] == "0.5 → 0.8 [0.700, 0.900], above chance"
    assert rows["reward"]["off the slice"] == "0.45 → 0.52 [0.440, 0.600], not distinguishable from chance"
    assert rows["pretrain"]["all held-out prompts"] == "8.31 → 3.12" and rows["pretrain"]["on the slice"] == "—"
    assert rows["tokenizer"]["all held-out prompts"] == "3.4"

    # The planted mistake, in plain words, right under the table (from the recorded demonstrator argument).
    disclosure = text[text.index("**A planted mistake, disclosed.**") :].split("\n\n")[0]
    assert text.index("## What each stage changed") < text.index("**A planted mistake") < text.index("## Plots")
    assert "on `number_sorting` prompts asking for descending order it answers in ascending order in 70%" in disclosure
    assert "`sft` is trained to copy" in disclosure
    assert "`dpo`, `reward`, `rl` and `rlvr` learn from the task's scorer" in disclosure
    assert "After `sft` the model answers 20.0% of the slice's held-out prompts right, 50.0% off it." in disclosure
    assert "## Ablation" not in text
    assert "not run" not in text  # every stage of the run's recipe ran (other stage kinds are not "not run")

    for part in ("## Hardware", "CPU cores", "## Versions", "- torch:", "- trl:", "- python:", "## Recipe"):
        assert part in text, part
    assert "name: tiny" in text and "`pretrain.max_steps=5`" in text and "learning_rate: 3.0e-3" in text
    for png in ("accuracy.png", "rl_reward.png", "preference_training.png", "training_loss.png", "eval_metrics.png"):
        data = (run / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, png
        assert f"]({png})" in section(text, "Plots"), png


def test_every_raw_metric_is_in_the_appendix_once(tmp_path):
    text = write_report(make_run(tmp_path / "run")).read_text()
    appendix = section(text, "Appendix: every recorded metric")
    assert text.rstrip().endswith(appendix.rstrip())  # the last section
    [table] = tables(appendix)
    header = cells(table[0])
    assert header == ["metric", "tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "rlvr"]
    rows = rows_of(table)
    names = list(rows)
    # A measurement before and after: both rows, the before right above the after.
    assert names.index("eval_loss_before") + 1 == names.index("eval_loss")
    assert rows["task_accuracy_before"]["rl"] == "0.425" and rows["task_accuracy"]["rl"] == "0.55"
    assert rows["preference_accuracy_before"]["reward"] == "0.52"
    # A count recorded twice with the same value: once.
    assert "pairs_prompts_before" not in rows and rows["pairs_prompts"]["dpo"] == "900"
    assert "rm_agreement_pairs_before" not in rows and "rm_agreement_auc_before" in rows
    assert not any("_diff" in name or name.endswith("_p") for name in names)  # comparisons are in the lead table
    assert rows["eval_loss"]["pretrain"] == "3.12" and rows["eval_loss"]["dpo"] == "—"
    assert rows["bytes_per_token"]["tokenizer"] == "3.4"
    for key in ("wall_seconds", "tokens_seen", "tokens_per_second", "peak_memory_mb", "device", "world_size"):
        assert rows[key]["sft"] != "—", key
    assert rows["tokens_seen"]["rl"] == "20,480"


def test_details_keep_the_per_task_comparisons_and_rl(tmp_path):
    text = write_report(make_run(tmp_path / "run")).read_text()
    details = section(text, "Details")
    [per_task] = tables(details)
    header = cells(per_task[0])
    assert header[:3] == ["stage", "compared with", "metric"] and "verdict" in header
    found = {(c[0], c[1], c[2]): dict(zip(header, c)) for c in map(cells, per_task[2:])}
    assert found[("dpo", "start model", "number_sorting_accuracy")]["difference"] == "+0.150"
    assert found[("dpo", "start model", "number_sorting_accuracy")]["verdict"] == "**gain**"
    assert ("dpo", "next-token control", "word_sequence_reversal_accuracy") in found
    assert not any(m in ("task_accuracy", "on_slice_accuracy", "off_slice_accuracy") for _, _, m in found)  # lead's
    assert "### rl: what sampling could find" in details and "### rlvr" not in details  # rlvr measured no headroom
    assert "used by rl: **no**" in details and "reward model not used" in details and "31.0%" in details
    assert "- pass@8: 0.5 -> 0.55" in details and "- headroom pass@8 - greedy: 0.2 -> 0.15" in details
    assert "### Reward model: agreement" in details
    assert "- On the slice (— prompts): 0.5 -> 0.8 (95% CI 0.7 to 0.9)." in details
    assert "- Off the slice (— prompts): 0.45 -> 0.52" in details


def test_report_copes_with_missing_stages(tmp_path, capsys):
    run = make_run(tmp_path / "run", stages=("pretrain",), recipe=False, demonstrator=None)
    cli.main(["report", str(run)])  # the `quill report` entry point
    assert capsys.readouterr().out.strip() == str(run / "report.md")
    text = (run / "report.md").read_text()
    lead, appendix = tables(text)
    assert cells(lead[0]) == ["stage", "measured", "all held-out prompts"]  # no slice measured: no slice columns
    assert list(rows_of(lead)) == ["tokenizer", "pretrain"]
    assert cells(appendix[0]) == ["metric", "tokenizer", "pretrain"]
    assert "not run: sft, dpo, reward, rl" in text and "No `quill_run.json`" in text
    assert "A planted mistake" not in text and "## Details" not in text
    assert (run / "training_loss.png").exists() and (run / "eval_metrics.png").exists()
    for png in ("rl_reward.png", "accuracy.png", "preference_training.png"):
        assert not (run / png).exists() and png not in text


def test_report_on_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run folder") and "\n" not in err


def test_ablation_adds_the_other_runs_table(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    clean = make_run(tmp_path / "clean", stages=("pretrain", "sft", "dpo"), demonstrator=None)
    record = json.loads((clean / "quill_run.json").read_text())  # older markers: the rate only in the run record
    record["stages"].append({"name": "sft", "command": ["python", "-m", "quill.stages.sft", "demonstrator.rate=0"]})
    (clean / "quill_run.json").write_text(json.dumps(record))
    cli.main(["report", str(run), "--ablation", str(clean)])
    assert capsys.readouterr().out.strip() == str(run / "report.md")
    text = (run / "report.md").read_text()
    ablation = section(text, "Ablation: demonstrator rate 0")
    assert text.index("**A planted mistake") < text.index("## Ablation") < text.index("## Plots")  # next to the lead
    assert str(clean) in ablation
    [table] = tables(ablation)
    assert cells(table[0]) == cells(tables(text)[0][0])  # the same columns as the main table
    assert list(rows_of(table)) == ["tokenizer", "pretrain", "sft", "dpo", "dpo vs control"]
    assert rows_of(table)["dpo"]["on the slice"].startswith("0.200 → 0.500: +0.300 [")


@pytest.mark.parametrize("problem", ["missing", "no run record"])
def test_a_bad_ablation_folder_is_a_one_line_error(tmp_path, capsys, problem):
    run = make_run(tmp_path / "run")
    other = tmp_path / "other"
    if problem == "no run record":
        make_run(other, stages=("pretrain",), recipe=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(run), "--ablation", str(other)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ablation:") and str(other) in err and "fix:" in err and "\n" not in err
    assert ("not found" if problem == "missing" else "no quill_run.json") in err
    assert not (run / "report.md").exists()  # checked before anything is written


def test_accuracy_bars_carry_95_percent_intervals(tmp_path):
    from quill.stats import wilson_interval
    from quill.tools.report import load_stages
    from quill.tools.report_plots import accuracy_bars

    names, bars = accuracy_bars(load_stages(make_run(tmp_path / "run")))
    assert names == ["sft", "dpo", "rl", "rlvr"]
    assert list(bars) == ["all held-out prompts", "on the slice", "off the slice"]
    i, value, low, high = bars["on the slice"][1]  # dpo: 150 of the 300 slice prompts right
    assert (i, value) == (1, 0.5) and (low, high) == pytest.approx(wilson_interval(150, 300))
    assert bars["off the slice"][0][1] == 0.5 and len(bars["all held-out prompts"]) == 4


def test_rl_reward_rolling_mean_covers_the_whole_run():
    from quill.tools.report_plots import rolling_mean

    raw = [0.0, 1.0, 0.5, 0.5, 2.0]
    smooth = rolling_mean(raw, window=2)
    assert len(smooth) == len(raw) and not math.isnan(smooth[0])
    assert smooth == pytest.approx([0.0, 0.5, 0.75, 0.5, 1.25])
    assert rolling_mean(raw, window=1) == raw and rolling_mean([], window=3) == []


def test_the_smoothing_window_smooths_a_short_run():
    from quill.tools.report_plots import smoothing_window

    # The tiny recipe's GRPO logs 16 rows: a tenth of them is 1 row, which would redraw the raw points.
    assert [smoothing_window(n) for n in (1, 2, 16, 40, 200)] == [1, 2, 3, 4, 20]


def test_rl_reward_plot_draws_every_logged_step(tmp_path, monkeypatch):
    from quill.tools import report_plots

    run = make_run(tmp_path / "run", stages=("rl", "rlvr"), log_rows=40)
    drawn = []  # (label, steps) of each smoothed line
    smoothed = report_plots._smoothed

    def spy(ax, points, label, window):
        drawn.append((label, [step for step, _ in points]))
        smoothed(ax, points, label, window)

    monkeypatch.setattr(report_plots, "_smoothed", spy)
    write_report(run)
    assert (run / "rl_reward.png").read_bytes().startswith(PNG_SIGNATURE)
    labels = [label for label, _ in drawn]
    assert labels.count("reward (rolling mean of 4 log rows)") == 2  # rl and rlvr (kind rl), window 40 // 10
    # One reward function: its mean is the total, drawn once (the real runs drew two identical lines).
    assert not [label for label in labels if label.startswith("rewards/")]
    assert all(steps == list(range(1, 41)) for label, steps in drawn if label.startswith("reward"))


def test_teacher_control_and_paired_with_comparisons_lead_with_their_own_labels(tmp_path):
    """A distill stage's SFT control and teacher, and a classifier scored beside a from-scratch twin on the same rows
    (`paired_with`), each get a lead row that names what it is compared with, and no 'start model' mislabel."""
    from quill.stats import paired_difference

    run = make_run(tmp_path / "run", stages=("pretrain", "sft"))
    distill = run / "distill"
    distill.mkdir()
    metrics = {**accuracy_metrics(ROWS, CORRECT["dpo"]), **paired_metrics(ROWS, CORRECT["sft"], CORRECT["dpo"])}
    metrics |= paired_metrics(ROWS, CORRECT["control"], CORRECT["dpo"], "vs_control_")
    metrics |= paired_metrics(ROWS, CORRECT["rl"], CORRECT["dpo"], "vs_teacher_")
    (distill / "metrics.json").write_text(json.dumps({**metrics, **COST}))
    (distill / MARKER).write_text(json.dumps({"done": True, "stage": "distill"}))
    classify = run / "classify"
    classify.mkdir()
    versus = paired_difference(CORRECT["sft"], CORRECT["dpo"]).as_metrics("accuracy_vs_classify_scratch")
    (classify / "metrics.json").write_text(json.dumps({"accuracy": 0.8, **versus, **COST}))
    (classify / MARKER).write_text(json.dumps({"done": True, "stage": "classify"}))
    text = write_report(run).read_text()
    lead = rows_of(tables(section(text, "What each stage changed"))[0])
    assert "SFT control" in lead["distill vs control"]["measured"]
    assert "teacher" in lead["distill vs teacher"]["measured"]
    row = lead["classify vs `classify_scratch`"]
    assert row["measured"] == "held-out accuracy vs `classify_scratch`"
    diff = versus["accuracy_vs_classify_scratch_diff"]
    assert f"{diff:+.3f}" in row["all held-out prompts"]
    assert "| classify | start model |" not in text


def test_no_planted_mistake_paragraph_for_a_run_that_read_no_default_data(tmp_path):
    """Every stage records its `demonstrator` option, but it only shapes the default data: a run whose stages read
    other data (the encoder recipe's `quill:encoder/` sets) gets no disclosure of a mistake it never saw."""
    run = make_run(tmp_path / "run", stages=("pretrain",))
    for stage in ("pretrain", "tokenizer"):
        marker = json.loads((run / stage / MARKER).read_text())
        sources = {"dataset_mixture": [{"path": "quill:encoder/mlm_train", "identity": None}]}
        marker["fingerprint"] = {"sources": sources, "settings": {"demonstrator": DEMONSTRATOR, "seed": 0}}
        (run / stage / MARKER).write_text(json.dumps(marker))
    assert "planted mistake" not in write_report(run).read_text().lower()
    marker["fingerprint"]["sources"]["dataset_mixture"][0]["path"] = "quill:default/pretrain_train"
    (run / "tokenizer" / MARKER).write_text(json.dumps(marker))
    assert "planted mistake" in write_report(run).read_text().lower()
