"""Preemption: SIGTERM (or SLURM's early SIGUSR1) while a stage trains. The stage finishes the step, saves a complete
checkpoint with the Trainer's own save, exits with PREEMPTED_EXIT (75) and one line saying how to resume; more
signals during that save change nothing; the re-run resumes to the weights of an uninterrupted run.

The first signal is sent as soon as training has begun (`metrics_before.json` is written at on_train_begin, after
the handler is installed); once the checkpoint folder appears, SIGTERM and SIGUSR1 alternate every 5 ms until the
process exits, so later signals land during the save and the exit. Pretrain (Trainer) and SFT (SFTTrainer) run in
the quick suite; DPO, reward and GRPO, which need uninterrupted references built here, are marked slow.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_resume import assert_same_weights, newest_complete_checkpoint, run_ok, stage_cmd
from tiny_outputs import REPO, is_done, stage_argv

from quill.errors import PREEMPTED_EXIT
from quill.output import checkpoints, is_complete_checkpoint

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


PREEMPTIBLE_STAGE = '''
"""A fake stage that waits to be preempted: on SIGTERM/SIGUSR1 it records the signal and exits 75, as a training
stage does after saving its checkpoint (quill.stages.guards)."""
import signal, sys, time
from pathlib import Path
from fake_stage import ARG_TYPES
from quill.errors import PREEMPT_SIGNALS, PREEMPTED_EXIT, run_guarded
from quill.options import parse_stage_args

def train(fake, model, output):
    out = Path(output.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    def stop(signum, frame):
        (out / "signal.txt").write_text(signal.Signals(signum).name)
        print("[quill] a: stopped; run the same command again to resume (exit code 75: preempted)", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, stop)
    (out / "started").write_text("")
    time.sleep(120)

def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))

if __name__ == "__main__":
    main()
'''


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_quill_run_passes_a_preemption_signal_to_the_stage_and_exits_75(tmp_path, sig):
    """Kubernetes signals only the container's PID 1 (here `quill run`), and SLURM's --signal may too: the runner
    passes the signal on to the running stage (which saves and exits 75), records the stage as preempted, and exits
    75 itself with one line saying to re-run. Without the forwarding the runner dies and leaves the stage running."""
    import shutil
    import textwrap

    from tiny_outputs import add_fake_stage

    recipe = tmp_path / "rec"
    recipe.mkdir()
    add_fake_stage(recipe)
    (recipe / "preemptible_stage.py").write_text(PREEMPTIBLE_STAGE)
    (recipe / "recipe.yaml").write_text(
        textwrap.dedent(
            """
            name: fake
            stages:
              - {name: a, module: preemptible_stage}
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "QUILL_DEBUG"}
    runner = subprocess.Popen(
        [shutil.which("quill"), "run", str(recipe), "--output-dir", "out"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    started = tmp_path / "out" / "a" / "started"
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and runner.poll() is None:
        time.sleep(0.1)
    assert started.exists(), runner.communicate(timeout=30)
    runner.send_signal(sig)  # the runner only, as a container runtime does
    _, stderr = runner.communicate(timeout=60)
    assert runner.returncode == PREEMPTED_EXIT, stderr
    assert (tmp_path / "out" / "a" / "signal.txt").read_text() == sig.name
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("quill: stage 'a' was preempted") and "re-run the same command" in lines[-1]
    record = json.loads((tmp_path / "out" / "quill_run.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["preempted"]
