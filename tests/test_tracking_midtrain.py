"""A tiny `quill run tiny-midtrain` (tokenizer -> pretrain -> midtrain -> SFT) with report_to: [tensorboard, trackio]:
the mid-training recipe runs end to end and its report shows what mid-training did, and both trackers (offline) hold
exactly the losses each stage's training_log.json holds, grouped as one run."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("trackio", reason="the tracking extra (pip install quill[tracking]) is not installed")
pytest.importorskip("tensorboard", reason="the tracking extra (pip install quill[tracking]) is not installed")

REPO = Path(__file__).resolve().parents[1]
TRAINED = ["pretrain", "midtrain", "sft"]
TINY = [
    "tokenizer.vocab_size=512",
    "tokenizer.dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 300}]",
    "tokenizer.eval_size=20",
    "pretrain.model_config={depth: 1, hidden_size: 64, num_attention_heads: 2, intermediate_size: 128}",
    "pretrain.dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 300}]",
    "pretrain.eval_size=20",
    "midtrain.dataset_mixture=[{path: quill:default/sft_train, format: chat_text, max_samples: 200}, "
    "{path: quill:default/pretrain_train, max_samples: 100}]",
    "midtrain.eval_size=20",
    "sft.dataset_mixture=[{path: quill:default/sft_train, max_samples: 200}]",
    "sft.eval_size=20",
    "max_length=128",
    "task_eval_limit=8",
    "per_device_train_batch_size=4",
    "per_device_eval_batch_size=8",
    "max_steps=3",
    "save_steps=2",
    "logging_steps=1",
    "warmup_steps=0",
    "report_to=[tensorboard, trackio]",
]

# Reads the trackio store (TRACKIO_DIR is read when trackio is imported): {run: [[step, train/loss], ...]}.
READ_TRACKIO = """
    import json, sys
    from trackio.sqlite_storage import SQLiteStorage
    project, runs = sys.argv[1], sys.argv[2:]
    # The trainer's step is `train/global_step` (transformers' TrackioCallback logs it); trackio's own `step` counts
    # its log calls, from 0 or 1 depending on what was logged first.
    logs = {run: SQLiteStorage.get_logs(project, run) for run in runs}
    print(json.dumps({run: [[row["train/global_step"], row["train/loss"]] for row in rows
                            if row.get("train/loss") is not None] for run, rows in logs.items()}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("midtrain")
    out = base / "out"
    env = {**__import__("tiny_outputs").stage_env(tmp_path_factory.getbasetemp()), "TRACKIO_DIR": str(base / "trackio")}
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    cmd = [sys.executable, "-m", "quill.cli", "run", "tiny-midtrain", "--output-dir", str(out), *TINY]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out, env


def logged_losses(folder: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in json.loads((folder / "training_log.json").read_text()) if "loss" in r]


def test_midtrain_runs_between_pretrain_and_sft_and_the_report_shows_what_it_did(run):
    out, _ = run
    for stage in ("tokenizer", *TRAINED):
        assert json.loads((out / stage / "quill_stage.json").read_text())["done"] is True
    assert json.loads((out / "sft" / "quill_stage.json").read_text())["base_model"] == str((out / "midtrain").resolve())
    midtrain = json.loads((out / "midtrain" / "metrics.json").read_text())
    assert midtrain["eval_loss"] < midtrain["eval_loss_before"]  # held-out rows of the task-heavy mixture
    appendix = (out / "report.md").read_text().split("## Appendix: every recorded metric", 1)[1]
    table = [line for line in appendix.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == ["metric", "tokenizer", *TRAINED]
    assert any(line.startswith("| eval_loss_before |") for line in table)


def test_tensorboard_events_hold_each_stage_losses_under_one_run(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    [group] = list((out / "tensorboard").iterdir())  # one folder for the whole `quill run`
    assert group.name.startswith("tiny-midtrain-")
    assert sorted(p.name for p in group.iterdir()) == sorted(TRAINED)
    for stage in TRAINED:
        events = EventAccumulator(str(group / stage))
        events.Reload()
        logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
        expected = logged_losses(out / stage)
        assert len(expected) == 3
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 on disk


def test_trackio_store_holds_each_stage_losses_in_one_project(run):
    out, env = run
    [group] = [p.name for p in (out / "tensorboard").iterdir()]  # the run name both trackers were given
    read = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(READ_TRACKIO), group, *TRAINED],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    logged = json.loads(read.stdout.strip().splitlines()[-1])
    for stage in TRAINED:
        assert logged[stage] == [list(p) for p in logged_losses(out / stage)], stage
