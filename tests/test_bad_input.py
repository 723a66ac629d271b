"""Malformed inputs through the CLI: each one exits non-zero with exactly ONE stderr line `error: ... fix: ...`,
no traceback, and leaves finished outputs untouched.

Every case runs `quill ...` in a subprocess. Most fail in config parsing or the data checks, before a model loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tiny_outputs import PRETRAIN_OPTIONS, SFT_OPTIONS, TINY_MODEL, rl_argv, run_quill, tree_hash

PRETRAIN_SMALL = [*PRETRAIN_OPTIONS, "eval_size=0", "max_steps=2"]
SFT_SMALL = [*SFT_OPTIONS, "eval_size=0", "max_steps=2"]


# ----------------------------------------------------------------------------- shared tiny outputs (same as the
# other fault tests: built once per session under the session's base temp dir, skipped when already finished)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    shown = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-3000:]}\n--- stdout\n{proc.stdout[-2000:]}"
    assert proc.returncode != 0, shown
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, shown
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith("error:"), shown
    assert "fix:" in line, shown
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in: {line}"
    return line


# ----------------------------------------------------------------------------- the catalogue


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def _pretrain_on(c, data: str) -> list[str]:
    """The tiny pretraining command, reading `data` as its only dataset."""
    return [
        "pretrain",
        "--config",
        "recipes/tiny/pretrain.yaml",
        f"output_dir={c.out}",
        f"tokenizer_name_or_path={c.tok}",
        TINY_MODEL,
        f"dataset_mixture=[{{path: {data}}}]",
        *PRETRAIN_SMALL,
    ]


def _tune_on(c, stage: str, data: str) -> list[str]:
    """The tiny `stage` (sft or dpo) command on the pretrained model, reading `data` as its only dataset."""
    return [
        stage,
        "--config",
        f"recipes/tiny/{stage}.yaml",
        f"output_dir={c.out}",
        f"model_name_or_path={c.pre}",
        f"dataset_mixture=[{{path: {data}}}]",
        *SFT_SMALL,
    ]


def case_yaml_syntax(c):
    (c.tmp / "bad.yaml").write_text("learning_rate: 1e-3\nmax_steps: [1, 2\nseed: 0\n")
    return ["pretrain", "--config", str(c.tmp / "bad.yaml"), f"output_dir={c.out}"], ["invalid YAML"]


def case_unknown_key(c):
    return ["pretrain", "--config", "recipes/tiny/pretrain.yaml", f"output_dir={c.out}", "learning_rat=1e-3"], [
        "learning_rat",
        "learning_rate",
    ]


def case_unknown_key_in_file(c):
    (c.tmp / "c.yaml").write_text("per_device_train_batch_sise: 4\n")
    return ["pretrain", "--config", str(c.tmp / "c.yaml"), f"output_dir={c.out}"], [
        "per_device_train_batch_sise",
        "per_device_train_batch_size",
    ]


def case_wrong_type(c):
    return ["pretrain", "--config", "recipes/tiny/pretrain.yaml", f"output_dir={c.out}", "max_steps=lots"], [
        "max_steps"
    ]


def case_out_of_range(c):
    return ["pretrain", "--config", "recipes/tiny/pretrain.yaml", f"output_dir={c.out}", "learning_rate=-0.1"], [
        "learning_rate"
    ]


def case_nothing_to_train(c):
    return [
        "pretrain",
        "--config",
        "recipes/tiny/pretrain.yaml",
        f"output_dir={c.out}",
        "max_steps=0",
        "num_train_epochs=0",
    ], ["nothing to train"]


def case_dataset_not_found(c):
    return _pretrain_on(c, f"{c.tmp}/nope.jsonl"), ["nope.jsonl"]


def case_missing_column(c):
    f = _jsonl(c.tmp / "d.jsonl", [{"body": "some text"}, {"body": "more text"}])
    return _pretrain_on(c, f), ["expected columns text", "body"]


def case_misnamed_column(c):
    f = _jsonl(
        c.tmp / "d.jsonl",
        [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    )
    return _tune_on(c, "sft", f), ["conversations: messages"]


def case_empty_dataset(c):
    (c.tmp / "empty.jsonl").write_text("")
    return _pretrain_on(c, f"{c.tmp}/empty.jsonl"), ["empty"]


def case_empty_text_rows(c):
    f = _jsonl(c.tmp / "d.jsonl", [{"text": "fine"}, {"text": "   "}])
    return _pretrain_on(c, f), ["row 1", "text"]


def case_non_utf8(c):
    (c.tmp / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
    return _pretrain_on(c, f"{c.tmp}/latin1.txt"), ["UTF-8"]


def case_unknown_role(c):
    f = _jsonl(
        c.tmp / "d.jsonl", [_msgs(("user", "hi"), ("assistant", "hello")), _msgs(("user", "hi"), ("bot", "hello"))]
    )
    return _tune_on(c, "sft", f), ["row 1", "'bot'"]


def case_no_assistant_turn(c):
    f = _jsonl(c.tmp / "d.jsonl", [_msgs(("system", "be nice"), ("user", "hi"))])
    return _tune_on(c, "sft", f), ["row 0", "assistant"]


def case_chosen_equals_rejected(c):
    f = _jsonl(
        c.tmp / "d.jsonl",
        [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "3+3?", "chosen": "6", "rejected": "6"}],
    )
    return [*_tune_on(c, "dpo", f), "pairs_from=dataset", "control=false"], ["row 1", "rejected"]


def case_policy_pairs_from_chosen_rejected_data(c):
    # pairs_from: auto would train on these pairs; forcing policy pairs on them is the error this case checks.
    f = _jsonl(c.tmp / "d.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    return [*_tune_on(c, "dpo", f), "control=false", "pairs_from=policy"], [
        "pairs_from: policy",
        "task and answer columns",
        "pairs_from: dataset",
    ]


def case_rl_with_no_learnable_prompt(c):
    # The pretrained (not instruction-tuned) model answers no task prompt right, in any sample.
    extra = ["reward_model_path=null", "verifiable_reward=true", "learnable_prompt_samples=2"]
    needles = ["no prompt is left to learn from", "learnable_prompt_samples"]
    return ["rl", *rl_argv(c.out, c.pre, c.pre, *extra)], needles


def case_vocab_mismatch(c):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(c.tok)
    tok.add_tokens([f"extra_token_{i}" for i in range(300)])
    tok.save_pretrained(c.tmp / "bigtok")
    return [
        "sft",
        "--config",
        "recipes/tiny/sft.yaml",
        f"output_dir={c.out}",
        f"model_name_or_path={c.pre}",
        f"tokenizer_name_or_path={c.tmp / 'bigtok'}",
        *SFT_SMALL,
    ], ["vocabulary"]


def case_previous_stage_missing_run(c):
    return ["run", "recipes/tiny", "--from", "sft", "--until", "sft", "--output-dir", str(c.tmp / "run")], ["pretrain"]


def case_model_folder_missing(c):
    return [
        "sft",
        "--config",
        "recipes/tiny/sft.yaml",
        f"output_dir={c.out}",
        f"model_name_or_path={c.tmp / 'no_such_model'}",
        f"tokenizer_name_or_path={c.tok}",
        *SFT_SMALL,
    ], ["no_such_model"]


def case_corrupted_safetensors(c):
    broken = c.tmp / "broken"
    shutil.copytree(c.pre, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return [
        "sft",
        "--config",
        "recipes/tiny/sft.yaml",
        f"output_dir={c.out}",
        f"model_name_or_path={broken}",
        *SFT_SMALL,
    ], ["broken"]


def case_invalid_accelerate_config(c):
    (c.tmp / "acc.yaml").write_text("distributed_type: [not, valid\nnum_processes: two\n")
    return [
        "run",
        "recipes/tiny",
        "--until",
        "tokenizer",
        "--output-dir",
        str(c.tmp / "run"),
        "--accelerate-config",
        str(c.tmp / "acc.yaml"),
    ], ["acc.yaml"]


def case_unknown_accelerate_config_name(c):
    return [
        "run",
        "recipes/tiny",
        "--until",
        "tokenizer",
        "--output-dir",
        str(c.tmp / "run"),
        "--accelerate-config",
        "cpu_dpp",
    ], ["cpu_dpp"]


def case_output_dir_is_a_file(c):
    (c.tmp / "afile").write_text("x")
    return [
        "pretrain",
        "--config",
        "recipes/tiny/pretrain.yaml",
        f"output_dir={c.tmp / 'afile'}",
        f"tokenizer_name_or_path={c.tok}",
        TINY_MODEL,
        *PRETRAIN_SMALL,
    ], ["is a file"]


def case_output_dir_not_writable(c):
    ro = c.tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores the mode bits
        ro.chmod(0o700)
        pytest.skip("running as root: a read-only folder is still writable")
    c.cleanup.append(lambda: ro.chmod(0o700))
    return [
        "pretrain",
        "--config",
        "recipes/tiny/pretrain.yaml",
        f"output_dir={ro / 'out'}",
        f"tokenizer_name_or_path={c.tok}",
        TINY_MODEL,
        *PRETRAIN_SMALL,
    ], ["not writable"]


def case_fp16_and_bf16(c):
    return ["sft", "--config", "recipes/tiny/sft.yaml", f"output_dir={c.out}", "fp16=true", "bf16=true"], [
        "fp16",
        "bf16",
    ]


def case_merge_without_peft(c):
    return ["sft", "--config", "recipes/tiny/sft.yaml", f"output_dir={c.out}", "merge_lora_on_save=true"], [
        "merge_lora_on_save",
        "use_peft",
    ]


def case_scratch_and_checkpoint(c):
    return [
        "sft",
        "--config",
        "recipes/tiny/sft.yaml",
        f"output_dir={c.out}",
        f"model_name_or_path={c.pre}",
        TINY_MODEL,
    ], ["model_config", "model_name_or_path"]


def case_mixture_entry_without_path(c):
    return [
        "pretrain",
        "--config",
        "recipes/tiny/pretrain.yaml",
        f"output_dir={c.out}",
        "dataset_mixture=[{max_samples: 3}]",
    ], ["path"]


def case_unknown_command(c):
    return ["pretrian", "--config", "recipes/tiny/pretrain.yaml"], ["pretrian", "pretrain"]


def case_override_for_no_stage(c):
    return ["run", "recipes/tiny", "--until", "tokenizer", "--output-dir", str(c.tmp / "run"), "no_such_option=1"], [
        "no_such_option"
    ]


CASES = {name[len("case_") :]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


class Ctx:
    def __init__(self, tmp: Path, tiny: dict):
        self.tmp, self.tok, self.pre = tmp, tiny["tok"], tiny["pre"]
        self.out = tmp / "out"
        self.cleanup = []


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_is_one_clean_error(name, tiny, tmp_path):
    assert len(CASES) >= 20
    ctx = Ctx(tmp_path, tiny)
    argv, needles = CASES[name](ctx)
    before = {p: tree_hash(p) for p in (tiny["tok"], tiny["pre"])}
    try:
        proc = run_quill(argv, tiny["env"])
        assert_one_line_error(proc, *needles)
    finally:
        for undo in ctx.cleanup:
            undo()
    # Finished outputs are never touched by a failing run, and a failed stage leaves no finished marker.
    assert {p: tree_hash(p) for p in before} == before
    assert not (ctx.out / "quill_stage.json").exists()


# ----------------------------------------------------------------------------- samples longer than max_length


@pytest.fixture(scope="module")
def overlong_sft(tiny, tmp_path_factory):
    """SFT on conversations far longer than max_length=32: TRL truncates them; the run must still finish."""
    tmp = tmp_path_factory.mktemp("overlong")
    long_answer = " ".join(f"word{i}" for i in range(400))
    f = _jsonl(tmp / "long.jsonl", [_msgs(("user", f"repeat {i}"), ("assistant", long_answer)) for i in range(16)])
    out = tmp / "sft"
    args = [a for a in SFT_SMALL if not a.startswith("max_length")]
    proc = run_quill(
        [
            "sft",
            "--config",
            "recipes/tiny/sft.yaml",
            f"output_dir={out}",
            f"model_name_or_path={tiny['pre']}",
            f"dataset_mixture=[{{path: {f}}}]",
            "task_eval=null",
            *args,
            "max_length=32",
        ],
        tiny["env"],
    )
    return proc, out


def test_overlong_samples_are_truncated_and_the_stage_finishes(overlong_sft):
    proc, out = overlong_sft
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "quill_stage.json").exists()
    log = json.loads((out / "training_log.json").read_text())
    seen = [row["num_input_tokens_seen"] for row in log if "num_input_tokens_seen" in row]
    # Every packed/truncated row is at most max_length tokens: 2 steps x batch 4 x 32 tokens.
    assert seen and max(seen) <= 2 * 4 * 32


def test_overlong_samples_truncation_is_reported(overlong_sft):
    proc, _ = overlong_sft
    assert proc.returncode == 0
    # The documented policy: TRL truncates, Quill counts and says so (all 16 conversations are ~800 tokens).
    assert "16 of 16 training samples checked are longer than max_length=32" in proc.stderr
