"""Preemption: SIGTERM (or SLURM's early SIGUSR1) while a stage trains. The stage finishes the step, saves a complete
checkpoint with the Trainer's own save, exits with PREEMPTED_EXIT (75) and one line saying how to resume; more
signals during that save change nothing; the re-run resumes to the weights of an uninterrupted run.

The first signal is sent as soon as training has begun (`metrics_before.json` is written at on_train_begin, after
the handler is installed); once the checkpoint folder appears, SIGTERM and SIGUSR1 alternate every 5 ms until the
process exits, so later signals land during the save and the exit. Pretrain (Trainer) and SFT (SFTTrainer) run in
the quick suite; DPO, reward and GRPO, which need uninterrupted references built here, are marked slow.
"""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_resume import assert_same_weights, newest_complete_checkpoint, run_ok, stage_cmd
from tiny_outputs import REPO, is_done, stage_argv

from quill.output import checkpoints, is_complete_checkpoint
from quill.stages.guards import PREEMPTED_EXIT

FIRST_SIGNAL = {"sft": signal.SIGUSR1}  # SLURM's --signal warning; the others get SIGTERM first
RESUME_HINT = "run the same command again to resume"


def preempt(cmd: list[str], env: dict, out: Path, first: signal.Signals, timeout: float = 300):
    """Run the stage, send `first` once training has begun and, once the checkpoint it causes has begun to be
    written, SIGTERM and SIGUSR1 alternately every 5 ms until the stage exits. Returns (process, stderr, number of
    later signals, how many of those were sent while the checkpoint was still incomplete)."""
    log = out.parent / f"{out.name}.preempted.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f)
    begun, deadline = out / "checkpoints" / "metrics_before.json", time.time() + timeout
    sent = during_save = 0
    try:
        while not begun.exists():
            if proc.poll() is not None:
                pytest.fail(f"stage exited ({proc.returncode}) before training began: {log.read_text()[-3000:]}")
            assert time.time() < deadline, "timed out waiting for training to begin"
            time.sleep(0.005)
        proc.send_signal(first)
        while not checkpoints(out) and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint after the signal"
            time.sleep(0.001)
        while proc.poll() is None:  # a second SIGTERM during the save, and more
            saving = not is_complete_checkpoint(checkpoints(out)[-1])
            proc.send_signal(signal.SIGTERM if sent % 2 == 0 else signal.SIGUSR1)
            sent, during_save = sent + 1, during_save + saving
            assert time.time() < deadline, "the preempted stage did not exit"
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, log.read_text(), sent, during_save


@pytest.fixture(scope="module")
def reference(tiny_post, tmp_path_factory):
    """The uninterrupted run of a stage: pretrain and SFT are the shared tiny folders; the others run here once."""
    root, built = tmp_path_factory.mktemp("uninterrupted"), {"pretrain": tiny_post["pre"], "sft": tiny_post["sft"]}

    def get(stage: str) -> Path:
        if stage not in built:
            built[stage] = root / stage
            run_ok(stage_cmd(stage, stage_argv(stage, built[stage], tiny_post)), tiny_post["env"])
        return built[stage]

    return get


@pytest.mark.parametrize(
    "stage", ["pretrain", "sft", *(pytest.param(s, marks=pytest.mark.slow) for s in ("dpo", "reward", "rl"))]
)
def test_preempted_stage_saves_exits_75_and_resumes_to_the_uninterrupted_weights(stage, tiny_post, reference, tmp_path):
    out = tmp_path / stage
    cmd = stage_cmd(stage, stage_argv(stage, out, tiny_post, "disable_tqdm=true"))
    first = FIRST_SIGNAL.get(stage, signal.SIGTERM)
    proc, stderr, sent, during_save = preempt(cmd, tiny_post["env"], out, first)

    shown = f"exit {proc.returncode}, {sent} later signals, {during_save} during the save\n{stderr[-3000:]}"
    assert proc.returncode == PREEMPTED_EXIT, shown
    assert sent >= 1 and "Traceback" not in stderr and "error:" not in stderr, shown
    [line] = [x for x in stderr.splitlines() if RESUME_HINT in x]
    assert f"stopped by {first.name} after step" in line, line
    step = int(re.search(r"after step (\d+)", line).group(1))
    assert 0 < step < 6, line  # stopped early, not at the end of training
    if stage == "rl":
        assert step % 2 == 0, line  # a GRPO generation buffer spans 2 steps here: the stop waits for its end

    # The checkpoint of the step it stopped at is complete (the Trainer's own files) and nothing newer exists.
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    assert str(ckpt) in line and newest_complete_checkpoint(out) == str(ckpt), shown
    assert [p.name for p in checkpoints(out)][-1] == ckpt.name
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()
    assert not is_done(out)

    rerun = run_ok(cmd, tiny_post["env"])
    resumed = [x for x in rerun.stderr.splitlines() if "resuming from" in x]
    assert len(resumed) == 1 and resumed[0].endswith(str(ckpt)), rerun.stderr[-2000:]
    assert is_done(out)
    assert_same_weights(reference(stage), out)
