"""Faults during a stage: a diverging loss stops it cleanly; a failing Hub push keeps the finished local folder.

Also checks the Hub token never leaks into outputs or logs, and that finished folders hold no pickles.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_outputs import pretrain_argv, run_quill

# ----------------------------------------------------------------------------- shared tiny outputs (built once per
# session under the session's base temp dir; the other fault-test files build the same folders the same way)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    shown = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode != 0, shown
    assert "Traceback" not in proc.stderr, shown
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error:") and "fix:" in errors[0], shown
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0], shown  # the error is the last word
    return errors[0]


# ----------------------------------------------------------------------------- NaN / inf loss


def test_diverging_loss_stops_with_one_line_error_and_keeps_last_good_checkpoint(tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "diverge"
    # lr=1e30: Adam's first update moves every weight by ~1e30, so the next forward pass overflows fp32 to inf/NaN.
    # Clipping is off so the (finite) first step is applied in full. disable_tqdm: the Trainer's progress bar shares
    # stderr and, cut off mid-line by the failure, would run into the error line (see the report on this test).
    proc = run_quill(
        [
            "pretrain",
            *pretrain_argv(
                out,
                tiny["tok"],
                "learning_rate=1e30",
                "max_grad_norm=0",
                "save_steps=1",
                "eval_size=0",
                "disable_tqdm=true",
            ),
        ],
        tiny["env"],
    )
    line = one_error_line(proc)
    assert proc.returncode == 2
    assert "NaN or inf" in line and "step" in line and "learning_rate" in line
    assert not (out / "quill_stage.json").exists()
    assert not (out / "model.safetensors").exists()

    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "the last good checkpoint must be kept"
    last = checkpoints[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == int(last.name.split("-")[1])
    # It really diverged: the failing step is the one after the last checkpoint, and every logged loss before it
    # is finite; the checkpoint itself holds only finite weights.
    failing_step = int(re.search(r"at step (\d+)", line).group(1))
    assert failing_step == state["global_step"] + 1
    assert all(math.isfinite(row["loss"]) for row in state["log_history"] if "loss" in row)
    weights = load_file(str(last / "model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())

    from quill.output import checkpoints, is_complete_checkpoint

    assert [p for p in checkpoints(out) if is_complete_checkpoint(p)][-1] == last


# ----------------------------------------------------------------------------- failing Hub push


@pytest.mark.parametrize("mode, attempts", [("down", 3), ("refusing", 1)])  # 503 is retried; 403 fails at once
def test_failed_push_retries_then_one_line_error_and_local_folder_is_complete(
    mode, attempts, tiny, hub_server, tmp_path
):
    out = tmp_path / "pushed"
    hub_server.set_mode(mode)
    env = {**hub_server.env(), "QUILL_CACHE": tiny["env"]["QUILL_CACHE"], "TOKENIZERS_PARALLELISM": "false"}
    env.pop("QUILL_DEBUG", None)
    proc = run_quill(
        [
            "pretrain",
            *pretrain_argv(out, tiny["tok"], "max_steps=2", "eval_size=0", "push_to_hub=true", "hub_model_id=user/x"),
        ],
        env,
    )
    line = one_error_line(proc)
    assert proc.returncode == 2
    assert "push to the Hub repo 'user/x' failed " + ("after 3 attempts" if attempts == 3 else "(HTTP 403") in line
    assert str(out) in line  # the fix names the complete local copy
    # Each attempt starts with a repo create: three for a server that is down, one for a refusal.
    assert len(hub_server.requests("POST", "/api/repos/create")) == attempts, hub_server.log

    # The local folder is finished and loads.
    assert json.loads((out / "quill_stage.json").read_text())["done"] is True
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.num_parameters() > 0

    # Security: the token is nowhere in the folder, the card, the config or the logs; no pickles were written.
    token = hub_server.token
    assert token not in proc.stdout and token not in proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    pickles = [p.name for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert pickles == []

    # The fix works and the card is user/x's: once the Hub answers again, `hf upload` of the folder as it is passes
    # the Hub's check of the card's metadata, and the card's usage example, run as written, loads the model from
    # user/x and answers.
    hub_server.set_mode("ok")
    upload = subprocess.run(
        [str(Path(sys.executable).with_name("hf")), "upload", "user/x", str(out), "."],
        env=hub_server.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert upload.returncode == 0, upload.stdout + upload.stderr
    example = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)
    assert example, "the card shows no usage example"
    ran = hub_server.run_python(example.group(1))
    assert "generated_text" in ran.stdout, ran.stdout
    assert hub_server.requests("GET", "/user/x/resolve/"), "the example did not load the model from user/x"
