"""Kill and resume gives the weights of an uninterrupted run, for every trainer: pretrain (Trainer), SFT, DPO,
reward and RL (TRL's SFTTrainer, DPOTrainer, RewardTrainer, GRPOTrainer). Slow: about 25 stage runs.

Each stage is SIGKILLed for real once checkpoint-2 is complete, while later steps run; copies of that folder then
serve three kill points:
  mid_save   plus a half-written newer checkpoint (a cut-off model.safetensors, no trainer_state.json) and a newer
             one whose trainer_state.json is cut off: both must be ignored and removed, the resume uses checkpoint-2.
  mid_finish plus the finished folder half-written beside the stage folder (`.<stage>.staged`, no marker): it must
             not be trusted; the stage resumes and finishes.
  mid_swap   killed between the two renames that swap the finished folder in: the stage folder (with its
             checkpoints) moved to `.<stage>.previous`, the complete `.<stage>.staged` not yet in place. The re-run
             completes the swap and skips the stage as finished.
RL's reward comes from a reward model whose scores differ between samples, so its weights really move, and its
checkpoints fall on generation-buffer boundaries (quill.stages.rl refuses others).
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_outputs import REPO, is_done, stage_argv, tree_hash

from quill.output import checkpoints, is_complete_checkpoint

pytestmark = pytest.mark.slow
STAGES = ["pretrain", "sft", "dpo", "reward", "rl"]
POINTS = ["mid_save", "mid_finish", "mid_swap"]
UPSTREAM = {"pretrain": "tok", "sft": "pre", "dpo": "sft", "reward": "sft", "rl": "sft"}


def stage_cmd(stage: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", f"quill.stages.{stage}", *argv]


def run_ok(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def weights(folder: Path) -> dict:
    name = "model.safetensors"
    return load_file(str(folder / name))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        diff = (wa[name].double() - wb[name].double()).abs().max().item()
        assert diff <= 1e-6, f"{name}: max abs diff {diff}"


def kill_after_checkpoint(cmd: list[str], env: dict, out: Path, step: int = 2, timeout: float = 600) -> None:
    """Start the stage and SIGKILL it as soon as checkpoint-`step` is complete. The Trainer writes trainer_state.json
    last but not atomically: killing when the file merely exists can cut it short, and the stage then rightly
    starts over instead of resuming (this raced once in CI)."""
    log = out.parent / f"{out.name}.killed.log"
    with open(log, "wb") as f:  # a file, not a pipe nobody reads while the stage runs
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f)
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    deadline = time.time() + timeout
    try:
        while not is_complete_checkpoint(ckpt):
            if proc.poll() is not None:
                pytest.fail(f"stage exited ({proc.returncode}) before checkpoint-{step}: {log.read_text()[-3000:]}")
            assert time.time() < deadline, "timed out waiting for the checkpoint"
            time.sleep(0.005)
        # Kill at once: the process is then between checkpoint-2 and the next save.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not is_done(out)


def newest_complete_checkpoint(out: Path) -> str | None:
    complete = [p for p in checkpoints(out) if is_complete_checkpoint(p)]
    return str(complete[-1]) if complete else None


def sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}"


def plant_half_written_checkpoints(out: Path) -> list[Path]:
    """Newer checkpoints than the last complete one, as a kill during `save` leaves them."""
    last = Path(newest_complete_checkpoint(out))
    step = int(last.name.split("-")[1])
    half = out / "checkpoints" / f"checkpoint-{step + 2}"  # weights cut off, no trainer_state.json yet
    half.mkdir(exist_ok=True)
    data = (last / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(data[: len(data) // 3])
    cut = out / "checkpoints" / f"checkpoint-{step + 4}"  # everything but a trainer_state.json cut off mid-write
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(last, cut)
    text = (last / "trainer_state.json").read_text().replace(f'"global_step": {step}', f'"global_step": {step + 4}')
    (cut / "trainer_state.json").write_text(text[: len(text) // 2])
    assert newest_complete_checkpoint(out) == str(last)
    return [half, cut]


def plant_half_written_finish(out: Path, finished: Path) -> None:
    staged = sibling(out, "staged")
    shutil.copytree(finished, staged)
    (staged / "quill_stage.json").unlink()
    data = (finished / "model.safetensors").read_bytes()
    (staged / "model.safetensors").write_bytes(data[: len(data) // 2])


def plant_interrupted_swap(out: Path, finished: Path) -> None:
    out.rename(sibling(out, "previous"))
    shutil.copytree(finished, sibling(out, "staged"))


@pytest.fixture(scope="module")
def references(tiny_post, tmp_path_factory):
    """Uninterrupted runs: pretrain and SFT are the shared tiny folders; DPO, reward and RL run here."""
    root = tmp_path_factory.mktemp("uninterrupted")
    refs = {"pretrain": tiny_post["pre"], "sft": tiny_post["sft"]}
    for stage in ("dpo", "reward", "rl"):
        refs[stage] = root / stage
        run_ok(stage_cmd(stage, stage_argv(stage, refs[stage], tiny_post)), tiny_post["env"])
    return refs


@pytest.fixture(scope="module")
def killed(tiny_post, tmp_path_factory):
    root = tmp_path_factory.mktemp("killed")
    runs = {}
    for stage in STAGES:
        runs[stage] = root / stage
        kill_after_checkpoint(
            stage_cmd(stage, stage_argv(stage, runs[stage], tiny_post)), tiny_post["env"], runs[stage]
        )
    return runs


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("stage", STAGES)
def test_kill_and_resume_matches_uninterrupted_run(stage, point, tiny_post, references, killed, tmp_path):
    upstream_hash = tree_hash(tiny_post[UPSTREAM[stage]])
    out = tmp_path / stage
    shutil.copytree(killed[stage], out)
    planted = plant_half_written_checkpoints(out) if point == "mid_save" else []
    if point == "mid_finish":
        plant_half_written_finish(out, references[stage])
    expected = newest_complete_checkpoint(out)
    if point == "mid_swap":
        plant_interrupted_swap(out, references[stage])

    proc = run_ok(stage_cmd(stage, stage_argv(stage, out, tiny_post)), tiny_post["env"])
    resumed = [line for line in proc.stderr.splitlines() if "resuming from" in line]
    if point == "mid_swap":
        assert not resumed and "already finished" in proc.stderr  # the complete staged folder was swapped in
    else:
        assert len(resumed) == 1 and resumed[0].endswith(expected), proc.stderr[-2000:]
        assert not any(p.exists() for p in planted)

    assert json.loads((out / "quill_stage.json").read_text())["done"] is True
    assert not (out / "checkpoints").exists()
    assert not sibling(out, "staged").exists() and not sibling(out, "previous").exists()
    assert_same_weights(references[stage], out)
    assert tree_hash(tiny_post[UPSTREAM[stage]]) == upstream_hash


def test_the_uninterrupted_runs_really_trained(references, tiny_post):
    """Equal weights prove nothing if a stage never moved them: every reference differs from where it started."""
    for stage in ("dpo", "rl"):
        start, end = weights(tiny_post["sft"]), weights(references[stage])
        assert max((start[k].double() - end[k].double()).abs().max().item() for k in start) > 1e-4, stage
