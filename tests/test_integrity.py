"""Output folders that cannot be corrupted: one process per folder, validate before destroying, the finished folder
swapped in whole, fingerprints that stop a resume or skip with other settings, a full disk that damages nothing,
and one `error:` line per failure under `quill run`.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tiny_outputs import REPO, TINY_MODEL, add_fake_stage, pretrain_argv, run_quill, sft_argv, tree_hash

from quill.errors import QuillError
from quill.output import folder_lock


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    # Progress bars redraw with \r: a line of stderr can hold several screen lines.
    return [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith(("error:", "[rank"))]


def one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    shown = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-3000:]}"
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, shown
    for needle in needles:
        assert needle in lines[0], shown
    return lines[0]


# ----------------------------------------------------------------------------- locks


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    with folder_lock(folder), pytest.raises(QuillError, match=rf"in use by pid {os.getpid()} on "), folder_lock(folder):
        pass
    # A holder killed with SIGKILL leaves its lock file, but not its lock: the next one takes over.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time
        from quill.output import folder_lock
        with folder_lock(__import__("pathlib").Path({str(folder)!r})):
            print("held", flush=True)
            time.sleep(60)
    """),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(QuillError, match=f"in use by pid {holder.pid}"), folder_lock(folder):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with folder_lock(folder):  # stale: taken over
        pass


@pytest.fixture
def slow_recipe(tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    add_fake_stage(folder)
    (folder / "recipe.yaml").write_text("name: slow\nstages:\n  - {name: a, module: fake_stage}\n")
    return folder


def quill(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "QUILL_DEBUG"}
    return subprocess.Popen(
        [sys.executable, "-m", "quill.cli", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_two_runs_on_one_folder_exactly_one_proceeds(slow_recipe, tmp_path):
    out = tmp_path / "out"
    first = quill("run", str(slow_recipe), "--output-dir", str(out), "a.seconds=6", cwd=tmp_path)
    deadline = time.time() + 60
    while not (tmp_path / ".out.lock").exists() or not (out / "quill_run.json").parent.exists():
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(1.5)  # the first run holds the folder while its stage sleeps
    second = subprocess.CompletedProcess([], *[None] * 3)
    proc = quill("run", str(slow_recipe), "--output-dir", str(out), "a.seconds=0", cwd=tmp_path)
    second.stdout, second.stderr = proc.communicate(timeout=60)
    second.returncode = proc.returncode
    line = one_error(second, "run folder", "is in use by pid", str(first.pid))
    first.communicate(timeout=120)
    assert first.returncode == 0 and line
    assert json.loads((out / "a" / "quill_stage.json").read_text())["done"] is True


def test_a_failing_stage_under_quill_run_prints_one_error_line(slow_recipe, tmp_path):
    proc = quill("run", str(slow_recipe), "--output-dir", str(tmp_path / "out"), "a.crash=true", cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess([], proc.returncode, stdout, stderr)
    one_error(done, "RuntimeError: boom")
    assert proc.returncode == 1  # the stage's own exit code
    assert "quill: stage 'a' failed (exit code 1)" in stderr and "re-run the same command" in stderr


def test_stage_names_cannot_leave_the_run_folder(slow_recipe, tmp_path):
    from quill.recipe import load_recipe

    (slow_recipe / "recipe.yaml").write_text("stages:\n  - {name: ../../x, module: fake_stage}\n")
    with pytest.raises(QuillError, match="a stage name is a folder name, not a path"):
        load_recipe(slow_recipe)


# ----------------------------------------------------------------------------- validate, then destroy


@pytest.fixture
def finished_pretrain(tiny, tmp_path):
    out = tmp_path / "pretrain"
    shutil.copytree(tiny["pre"], out)
    return out


def test_overwrite_with_bad_input_leaves_the_old_folder_byte_identical(tiny, finished_pretrain):
    before = tree_hash(finished_pretrain)
    proc = run_quill(
        [
            "pretrain",
            *pretrain_argv(
                finished_pretrain, tiny["tok"], "overwrite=true", "dataset_mixture=[{path: data/no_such_file.jsonl}]"
            ),
        ],
        tiny["env"],
    )
    one_error(proc, "no_such_file.jsonl")
    assert tree_hash(finished_pretrain) == before
    marker = finished_pretrain / "quill_stage.json"
    assert oct(marker.stat().st_mode & 0o777) == "0o644"  # readable by the group, like the other files


def test_a_rerun_with_other_settings_stops_and_says_what_differs(tiny, finished_pretrain):
    before = tree_hash(finished_pretrain)
    proc = run_quill(["pretrain", *pretrain_argv(finished_pretrain, tiny["tok"], "learning_rate=1e-4")], tiny["env"])
    one_error(proc, "finished earlier with other settings", "learning_rate: 0.003 -> 0.0001", "overwrite=true")
    assert tree_hash(finished_pretrain) == before
    same = run_quill(["pretrain", *pretrain_argv(finished_pretrain, tiny["tok"], "logging_steps=3")], tiny["env"])
    assert same.returncode == 0 and "already finished" in same.stderr  # logging does not change the weights


def test_a_rerun_after_a_lora_run_leaves_no_adapter_files(tiny, tmp_path):
    out = tmp_path / "sft"
    lora = run_quill(["sft", *sft_argv(out, tiny["pre"], "use_peft=true", "lora_r=4", "max_steps=2")], tiny["env"])
    assert lora.returncode == 0, lora.stderr[-2000:]
    assert (out / "adapter_config.json").exists()
    full = run_quill(["sft", *sft_argv(out, tiny["pre"], "max_steps=2", "overwrite=true")], tiny["env"])
    assert full.returncode == 0, full.stderr[-2000:]
    assert not list(out.glob("adapter_*")) and (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------- fingerprints on resume


def test_resume_with_another_batch_size_or_data_stops_with_one_line(tiny, tmp_path):
    from test_resume import kill_after_checkpoint, stage_cmd

    out = tmp_path / "pretrain"
    kill_after_checkpoint(stage_cmd("pretrain", pretrain_argv(out, tiny["tok"])), tiny["env"], out)
    before = tree_hash(out)
    proc = run_quill(["pretrain", *pretrain_argv(out, tiny["tok"], "per_device_train_batch_size=2")], tiny["env"])
    one_error(proc, "has checkpoints made with other settings", "per_device_train_batch_size: 4 -> 2")
    data = "dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 150}]"
    proc = run_quill(["pretrain", *pretrain_argv(out, tiny["tok"], data)], tiny["env"])
    one_error(proc, "has checkpoints made with other settings", "dataset_mixture")
    assert tree_hash(out) == before


# ----------------------------------------------------------------------------- a full disk

# Loaded into the stage process through PYTHONPATH: the first write into a path containing QUILL_ENOSPC_AT raises
# ENOSPC, as a full disk would. Only the tests use it; the product has no hook for it.
SITECUSTOMIZE = """
import errno, os, builtins
_needle = os.environ.get("QUILL_ENOSPC_AT")
if _needle:
    import safetensors.torch, torch

    def _full(path):
        if _needle in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    _save_file, _torch_save = safetensors.torch.save_file, torch.save
    def save_file(tensors, filename, *a, **k):
        _full(filename)
        return _save_file(tensors, filename, *a, **k)
    def save(obj, f, *a, **k):
        _full(f)
        return _torch_save(obj, f, *a, **k)
    safetensors.torch.save_file, torch.save = save_file, save
"""


@pytest.mark.parametrize("where", ["checkpoint-4", ".pretrain.staged"])
def test_disk_full_during_a_save_damages_nothing_and_the_next_run_resumes(tiny, tmp_path, where):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        **tiny["env"],
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), tiny["env"].get("PYTHONPATH")])),
        "QUILL_ENOSPC_AT": where,
    }
    out = tmp_path / "pretrain"
    upstream = tree_hash(tiny["tok"])
    proc = run_quill(["pretrain", *pretrain_argv(out, tiny["tok"])], env)
    one_error(proc, "no space left on the device", "resumes from its newest complete checkpoint")
    from quill.output import checkpoints, is_complete_checkpoint

    complete = [p.name for p in checkpoints(out) if is_complete_checkpoint(p)]
    assert complete and complete[-1] == ("checkpoint-2" if where == "checkpoint-4" else "checkpoint-6")
    assert not (out / "quill_stage.json").exists() and not (tmp_path / ".pretrain.staged").exists()
    assert tree_hash(tiny["tok"]) == upstream
    proc = run_quill(["pretrain", *pretrain_argv(out, tiny["tok"])], tiny["env"])
    assert proc.returncode == 0 and f"resuming from {out / 'checkpoints' / complete[-1]}" in proc.stderr
    assert json.loads((out / "quill_stage.json").read_text())["done"] is True


def test_tokenizer_stage_pushes_when_asked(hub_server, tiny, tmp_path):
    out = tmp_path / "tok"
    env = {**hub_server.env(), "QUILL_CACHE": tiny["env"]["QUILL_CACHE"], "TOKENIZERS_PARALLELISM": "false"}
    proc = run_quill(
        [
            "tokenizer",
            "--config",
            "recipes/tiny/tokenizer.yaml",
            f"output_dir={out}",
            "vocab_size=300",
            "dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 100}]",
            "eval_size=10",
            "push_to_hub=true",
            "hub_model_id=user/tok",
        ],
        env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hub_server.requests("POST", "/api/models/user/tok/commit")


# ----------------------------------------------------------------------------- secrets

SMALL_RUN = [
    "tokenizer.vocab_size=300",
    "tokenizer.dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 100}]",
    "tokenizer.eval_size=10",
    f"pretrain.{TINY_MODEL}",
    "pretrain.dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 100}]",
    "pretrain.eval_size=10",
    "sft.dataset_mixture=[{path: quill:default/sft_train, max_samples: 40}]",
    "sft.eval_size=8",
    "max_length=64",
    "task_eval_limit=4",
    "per_device_train_batch_size=4",
    "max_steps=2",
    "save_steps=1",
    "logging_steps=1",
]


def files_holding(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_a_planted_token_reaches_no_argv_file_or_output(hub_server, tiny, tmp_path):
    token = hub_server.token  # the planted secret: HF_TOKEN, and what the loopback Hub accepts
    env = hub_server.env(QUILL_CACHE=tiny["env"]["QUILL_CACHE"], TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "quill.cli", "run", "recipes/tiny", "--until", "sft", "--output-dir", str(out),
           *SMALL_RUN, "sft.push_to_hub=true", "sft.hub_model_id=user/secret-test"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_in_argv = set()
    while proc.poll() is None:  # every process's command line, while the run and its stages live
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if token.encode() in cmdline.read_bytes():
                    seen_in_argv.add(cmdline.parent.name)
            except OSError:
                pass
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert hub_server.requests("POST", "/api/models/user/secret-test/commit"), "the push must have used the token"
    assert not seen_in_argv
    assert token not in stdout and token not in stderr
    assert files_holding(out, token.encode()) == []
    assert files_holding(Path(env["HF_HOME"]), token.encode()) == []
    assert files_holding(hub_server.server.store.root, token.encode()) == []  # nor in what was pushed
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pkl", ".pickle")]  # no pickled arguments


def test_a_token_on_the_command_line_is_refused_without_echoing_it(tmp_path):
    secret = "hf_planted_secret_value_123"
    proc = run_quill(["run", "recipes/tiny", "--output-dir", str(tmp_path / "run"), f"hub_token={secret}"],
                     {k: v for k, v in os.environ.items() if k != "QUILL_DEBUG"})  # fmt: skip
    line = one_error(proc, "hub_token=***", "HF_TOKEN")
    assert secret not in proc.stdout + proc.stderr and secret not in line
    assert not (tmp_path / "run").exists()


def test_every_model_a_stage_computes_with_is_a_fingerprinted_source(tmp_path):
    """A retrained upstream model (the start model, RL's reward model, a distill stage's teacher) makes a finished
    stage stale: each is recorded as a source, recognised by when its stage finished."""
    from dataclasses import make_dataclass

    from quill.output import MARKER, fingerprint, fingerprint_difference

    for key in ("model_name_or_path", "reward_model_path", "teacher_model_name_or_path"):
        upstream = tmp_path / key
        upstream.mkdir()
        (upstream / MARKER).write_text(json.dumps({"done": True, "finished_at": "2026-12-07T10:00:00"}))
        args = make_dataclass("Args", [(key, str)])(str(upstream))
        before = fingerprint((args,))
        (upstream / MARKER).write_text(json.dumps({"done": True, "finished_at": "2026-12-07T11:00:00"}))
        assert fingerprint_difference(before, fingerprint((args,))), key
