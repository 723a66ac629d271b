"""Sharded training on CPU, for real: FSDP2 over two gloo processes, and DeepSpeed ZeRO-2/3.

accelerate 1.15 by itself turns FSDP off on CPU and trains with DDP (pipelines/stages/distributed.py switches it back
on); these tests prove the parameters really are sharded DTensors during training (tests/sharding_probe.py records
them on every rank), that the final folder holds the whole model, loads without Quill (its own modeling code, no
torch FSDP files), and equals a single-process run with the same global batch, and that the held-out loss is the
single-process value on the same weights. The FSDP pretraining run streams its data: only the main process reads it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import streamed_pretrain_argv
from safetensors.torch import load_file
from tiny_outputs import REPO, is_done, pretrain_argv, sft_argv

pytestmark = pytest.mark.slow  # two-process launches

ACCELERATE = REPO / "recipes" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, stage: str, argv: list[str], env: dict, probe: Path | None = None, timeout: float = 600):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--main_process_port", str(free_port())]
    cmd += [str(REPO / "tests" / "sharding_probe.py"), stage] if probe else ["-m", f"quill.stages.{stage}"]
    env = {**env, "OMP_NUM_THREADS": "1", **({"QUILL_PROBE_DIR": str(probe)} if probe else {})}
    return subprocess.run([*cmd, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_close_weights(a: Path, b: Path, tol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert worst <= tol, f"max abs weight difference {worst}"


def assert_loads_without_quill(folder: Path) -> None:
    """A fresh interpreter that never imports quill loads the folder through its own copied code."""
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "assert 'quill' not in sys.modules and type(m).__module__.startswith('transformers_modules'), type(m); "
        "print(m(torch.tensor([[1, 2, 3]])).logits.isfinite().all().item())"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("True"), done.stderr[-3000:]


def assert_sharded(probe: Path) -> None:
    """Both ranks saw every parameter as a DTensor whose local shard is half of dim 0 (rounded up / down)."""
    records = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert record["model_class"].startswith("FSDP"), record["model_class"]
        assert all(record["dtensor"].values()), record["dtensor"]
    for name, full in records[0]["full_shapes"].items():
        local = [rec["local_shapes"][name] for rec in records]
        assert local[0][1:] == local[1][1:] == full[1:], (name, local, full)
        assert local[0][0] + local[1][0] == full[0] and local[1][0] < full[0], (name, local, full)


def assert_whole_model_files(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    assert set(config["auto_map"].values()) <= {
        "configuration_quill.QuillConfig",
        "modeling_quill.QuillModel",
        "modeling_quill.QuillForCausalLM",
        "modeling_quill.QuillForSequenceClassification",
    }, config["auto_map"]
    assert (out / "modeling_quill.py").is_file() and not list(out.glob("_fsdp*.py"))
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))  # tied to the embedding, saved once


def test_fsdp2_streamed_pretrain_shards_and_saves_the_single_process_model(
    tiny, fineweb_local, streamed_reference, tmp_path
):
    out, probe = tmp_path / "pretrain", tmp_path / "probe"
    # 2 processes x 2 rows = the reference's 1 x 4 rows per step.
    argv = streamed_pretrain_argv(out, tiny["tok"], fineweb_local, "per_device_train_batch_size=2")
    env = {**tiny["env"], "ACCELERATE_USE_CPU": "true"}
    proc = launch(ACCELERATE / "cpu_fsdp2.yaml", "pretrain", argv, env, probe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert is_done(out)
    assert_sharded(probe)
    reads = [json.loads((probe / f"rank{r}.json").read_text())["read"] for r in (0, 1)]
    assert reads[0]["stream_rows"] >= 8 * 4 and reads[0]["streams_opened"] >= 1, reads
    assert reads[1] == {"stream_rows": 0, "streams_opened": 0}, reads  # the other rank read nothing itself

    assert_whole_model_files(out)
    assert_loads_without_quill(out)
    # Same data, same global batch, same initial weights: only float summation order differs.
    assert_close_weights(streamed_reference, out, tol=1e-4)
    single = json.loads((streamed_reference / "metrics.json").read_text())
    sharded = json.loads((out / "metrics.json").read_text())
    assert sharded["world_size"] == 2
    assert sharded["eval_loss_before"] == pytest.approx(single["eval_loss_before"], abs=1e-4)  # identical weights
    assert sharded["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-3)


def test_fsdp2_sft_shards_and_saves_the_single_process_model(tiny, tiny_post, tmp_path):
    sft_reference = tiny_post["sft"]  # the uninterrupted single-process SFT run
    out, probe = tmp_path / "sft", tmp_path / "probe"
    argv = sft_argv(out, tiny["pre"], "per_device_train_batch_size=2", "disable_tqdm=true")
    env = {**tiny["env"], "ACCELERATE_USE_CPU": "true"}
    proc = launch(ACCELERATE / "cpu_fsdp2.yaml", "sft", argv, env, probe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert is_done(out)
    assert_sharded(probe)
    assert_whole_model_files(out)
    assert_loads_without_quill(out)
    assert_close_weights(sft_reference, out, tol=1e-4)
    single = json.loads((sft_reference / "metrics.json").read_text())
    sharded = json.loads((out / "metrics.json").read_text())
    assert sharded["eval_loss_before"] == pytest.approx(single["eval_loss_before"], abs=1e-4)


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_on_cpu_trains_and_saves_the_whole_model(tiny, tmp_path, zero):
    """DeepSpeed's CPU accelerator over gloo (accelerate needs use_cpu: false for DeepSpeed, and the stage
    ddp_backend=gloo). ZeRO-3 checkpoints hold partitioned weights; the final save gathers them even though the
    config below leaves zero3_save_16bit_model off."""
    pytest.importorskip("deepspeed")
    out = tmp_path / f"zero{zero}"
    config = tmp_path / f"zero{zero}.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 2\nnum_machines: 1\n"
        'machine_rank: 0\nmixed_precision: "no"\nuse_cpu: false\nrdzv_backend: static\nsame_network: true\n'
        f"deepspeed_config:\n  zero_stage: {zero}\n  offload_optimizer_device: none\n  offload_param_device: none\n"
        "  zero3_init_flag: false\n  zero3_save_16bit_model: false\n  deepspeed_multinode_launcher: standard\n"
    )
    argv = pretrain_argv(out, tiny["tok"], "per_device_train_batch_size=2", "ddp_backend=gloo", "disable_tqdm=true")
    argv.remove("use_cpu=true")  # accelerate turns DeepSpeed off under use_cpu; DeepSpeed picks its CPU accelerator
    proc = launch(config, "pretrain", argv, tiny["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert is_done(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert_loads_without_quill(out)
    assert_close_weights(tiny["pre"], out, tol=1e-4)
    single = json.loads((tiny["pre"] / "metrics.json").read_text())
    assert metrics["eval_loss_before"] == pytest.approx(single["eval_loss_before"], abs=1e-4)
