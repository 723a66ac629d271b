"""A rank of a 2-process CPU run (DDP, FSDP2) is SIGKILLed mid-training: the other rank exits well within the stage's
collective timeout with one line naming the dead rank, nothing is marked done, and the re-run resumes from the last
complete checkpoint to the weights of an uninterrupted run. Slow: four two-process launches.

The launcher (torchrun under `accelerate launch`) then stops the survivor too and prints its own failure report;
the line checked here is the survivor's, written before that (quill.stages.distributed.watch_ranks).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import ACCELERATE, assert_close_weights, free_port
from test_resume import newest_complete_checkpoint
from tiny_outputs import REPO, is_done, pretrain_argv

pytestmark = pytest.mark.slow
TIMEOUT = 30  # ddp_timeout: seconds a collective waits for a rank before it fails


def launch_cmd(config: str, out: Path, tok: Path) -> list[str]:
    argv = pretrain_argv(out, tok, "per_device_train_batch_size=2", f"ddp_timeout={TIMEOUT}", "disable_tqdm=true")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config)]
    return [*cmd, "--main_process_port", str(free_port()), "-m", "quill.stages.pretrain", *argv]


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (their RANK variable)."""
    found = {}
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        try:
            env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks' processes through /proc")
@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "cpu_fsdp2.yaml"])
def test_a_killed_rank_is_named_and_the_rerun_resumes_from_the_last_checkpoint(config, tiny, tmp_path):
    out, log = tmp_path / "pretrain", tmp_path / "killed.log"
    env = {**tiny["env"], "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        launcher = subprocess.Popen(launch_cmd(config, out, tiny["tok"]), cwd=REPO, env=env, stdout=f, stderr=f)
    try:
        deadline, ranks = time.monotonic() + 300, {}
        while len(ranks) < 2 or not newest_complete_checkpoint(out):  # both ranks up, then the first checkpoint
            assert launcher.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            ranks = ranks if len(ranks) == 2 else rank_pids(launcher)
            time.sleep(0.005)
        os.kill(ranks[1], signal.SIGKILL)  # mid-training: the next steps need rank 1
        killed = time.monotonic()
        while running(ranks[0]):
            assert time.monotonic() - killed < 120, "the survivor is still running"
            time.sleep(0.05)
        survivor_seconds = time.monotonic() - killed
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    text = log.read_text()
    assert launcher.returncode != 0, text[-4000:]
    assert survivor_seconds < TIMEOUT, f"the survivor took {survivor_seconds:.1f} s"
    errors = [line for line in text.splitlines() if " error: " in line or line.startswith("error: ")]
    expected = newest_complete_checkpoint(out)  # what the re-run must resume from
    assert len(errors) == 1, text[-4000:]
    assert errors[0].startswith("[rank 0] error: rank 1 of this 2-process run died during training"), errors
    assert errors[0].endswith(f"it resumes from {Path(expected).name}"), errors
    assert not is_done(out)

    rerun = subprocess.run(launch_cmd(config, out, tiny["tok"]), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    resumed = [line for line in rerun.stderr.splitlines() if "resuming from" in line]
    assert len(resumed) == 1 and resumed[0].endswith(expected), rerun.stderr[-3000:]
    assert is_done(out)
    # The uninterrupted single-process run with the same global batch: float summation order apart, the same model.
    assert_close_weights(tiny["pre"], out, tol=1e-4)


class _Store:
    """The process group's store as dead_rank_error reads it: where each rank said it runs."""

    def __init__(self, where: dict[int, dict]):
        self.where = where

    def get(self, key: str) -> bytes:
        return json.dumps(self.where[int(key.rsplit("/", 1)[1])]).encode()


def test_a_rank_still_exiting_when_the_collective_fails_is_named_dead(tmp_path):
    # A killed rank's sockets close before the kernel has finished tearing it down, so the survivor's collective
    # can fail while the dead rank's process still shows as running (CI caught this once). A peer that exits 0.3 s
    # after the failure must be named as the rank that died, not as one that "did not answer".
    from types import SimpleNamespace

    import torch.distributed as dist

    from quill.stages.distributed import dead_rank_error

    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        store = _Store({1: {"host": socket.gethostname(), "pid": exiting.pid}})
        trainer = SimpleNamespace(
            args=SimpleNamespace(output_dir=str(tmp_path / "out" / "tmp"), ddp_timeout=TIMEOUT),
            state=SimpleNamespace(global_step=2),
        )
        err = dist.DistError("[gloo] Connection closed by peer")
        named = dead_rank_error(err, trainer, store, rank=0, world=2)
        assert named.problem.startswith("rank 1 of this 2-process run died during training (step 2)"), named.problem
    finally:
        exiting.wait()
    # A peer that stays alive is reported as not answering, not as dead.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store = _Store({1: {"host": socket.gethostname(), "pid": alive.pid}})
        named = dead_rank_error(err, trainer, store, rank=0, world=2)
        assert "no rank has died: rank 1 did not answer" in named.problem, named.problem
    finally:
        alive.kill()
        alive.wait()


def test_a_checkpoint_whose_other_rank_was_killed_while_saving_its_rng_state_is_not_complete(tmp_path):
    # The Trainer writes trainer_state.json on rank 0 without waiting for rank 1's rng_state_1.pth: CI's FSDP2 run
    # killed rank 1 in that window and the re-run failed with EOFError, resuming from the cut checkpoint.
    import torch

    from quill.output import is_complete_checkpoint

    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
        (ckpt / name).write_bytes(b"x")
    torch.save({"python": 1}, ckpt / "rng_state_0.pth")
    assert not is_complete_checkpoint(ckpt)  # rank 1's file not there yet
    torch.save({"python": 1}, ckpt / "rng_state_1.pth")
    assert is_complete_checkpoint(ckpt)
    whole = (ckpt / "rng_state_1.pth").read_bytes()
    (ckpt / "rng_state_1.pth").write_bytes(whole[: len(whole) // 2])  # killed mid-write
    assert not is_complete_checkpoint(ckpt)
