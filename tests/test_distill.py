"""The distill stage (TRL's DistillationTrainer): a recipe run that resumes exactly after a kill, a planted teacher
whose next-token distribution the student learns, a frozen teacher, and a teacher with another vocabulary refused.

The teacher and student are tiny Quills on the session's tiny tokenizer (tests/tiny_outputs.py). The planted
teacher puts the same distribution, softmax(PLANTED), on the next token whatever the context: every layer's output
projections are zero, so the last hidden state is the current token's embedding, which is the same vector for every
token, and the LM head maps it to PLANTED.
"""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_resume import assert_same_weights, kill_after_checkpoint, run_ok, weights
from tiny_outputs import REPO, is_done, tree_hash

from quill.data.tokenizer import train_tokenizer
from quill.loading import _padded_vocab, load_tokenizer
from quill.model import QuillConfig, QuillForCausalLM
from quill.output import mark_done
from quill.recipe import load_recipe, plan_recipe
from quill.runner import stage_command

TINY = {"depth": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
# Scoped to the distill stage of recipes/tiny-distill: a CI-sized run (6 steps, checkpoints every 2).
CI = [
    "distill.dataset_mixture=[{path: quill:default/sft_train, max_samples: 48}]",
    "distill.task_eval_limit=8",
    "distill.eval_max_new_tokens=8",
    "distill.max_completion_length=8",
    "distill.per_device_train_batch_size=4",
    "distill.max_steps=6",
    "distill.save_steps=2",
    "distill.logging_steps=1",
    "distill.warmup_steps=0",
    "distill.use_cpu=true",
    "distill.dataloader_num_workers=0",
]


def tiny_quill(tokenizer, seed: int, **config) -> QuillForCausalLM:
    torch.manual_seed(seed)
    ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return QuillForCausalLM(QuillConfig(**{**TINY, **config}, vocab_size=_padded_vocab(len(tokenizer)), **ids))


def save_model(model, tokenizer, folder, finished: bool = False):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if finished:  # a recipe's later stage needs its upstream stage's marker
        mark_done(folder, {"stage": folder.name})
    return folder


def planted_teacher(tokenizer, folder, logits: torch.Tensor):
    """A Quill whose next-token logits are `logits` at every position (see the module docstring)."""
    model = tiny_quill(tokenizer, seed=0, tie_word_embeddings=False)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0  # RMSNorm turns e_0 into sqrt(hidden) * e_0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits / math.sqrt(hidden)
    return save_model(model, tokenizer, folder)


def next_token_log_probs(model, tokenizer, prompts: list) -> torch.Tensor:
    """Log-probabilities of the first answer token after each chat prompt (left-padded, one batch)."""
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        return torch.log_softmax(model(**batch).logits[:, -1].float(), dim=-1)


# -- a recipe run, killed and resumed ----------------------------------------------------------------------------


def upstream(tiny, out, student_seed: int = 1):
    """The finished folders tiny-distill's distill stage needs: tokenizer, teacher (the tiny pretrained model), and
    a half-size student (its random start, marked finished as the recipe's student stage would be)."""
    shutil.copytree(tiny["tok"], out / "tokenizer")
    shutil.copytree(tiny["pre"], out / "teacher")
    tokenizer = load_tokenizer(str(tiny["tok"]))
    student = tiny_quill(tokenizer, seed=student_seed, hidden_size=16, num_attention_heads=1, intermediate_size=32)
    save_model(student, tokenizer, out / "student", finished=True)


@pytest.fixture(scope="module")
def recipe_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "run"
    upstream(tiny, out)
    teacher_hash = tree_hash(out / "teacher")
    cmd = [sys.executable, "-m", "quill.cli", "run", "recipes/tiny-distill", "--output-dir", str(out)]
    proc = subprocess.run([*cmd, "--from", "distill", *CI], cwd=REPO, env=tiny["env"], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc, teacher_hash


@pytest.mark.slow  # a recipe run and a SIGKILLed stage: several processes
def test_recipe_distills_into_the_student_only_and_reports_paired_comparisons(recipe_run):
    out, proc, teacher_hash = recipe_run
    metrics = json.loads((out / "distill" / "metrics.json").read_text())
    # The stage compared the student, on the same held-out prompts, with its start, the SFT control and the teacher.
    for key in ("task_accuracy_diff", "vs_control_task_accuracy_diff", "vs_teacher_task_accuracy_diff"):
        assert metrics[key.replace("_diff", "_n")] == 8, key
    assert "control_task_accuracy" in metrics and "teacher_task_accuracy" in metrics
    assert "distill: vs_teacher_task_accuracy" in proc.stderr
    # Only the student was trained and saved: its architecture, one weights file; the teacher's folder untouched.
    config = json.loads((out / "distill" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (16, 1)
    assert [p.name for p in (out / "distill").glob("*.safetensors")] == ["model.safetensors"]
    assert tree_hash(out / "teacher") == teacher_hash
    start, end = weights(out / "student"), weights(out / "distill")
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 1e-4  # it really trained


@pytest.mark.slow  # a recipe run and a SIGKILLed stage: several processes
def test_killed_distill_stage_resumes_to_the_uninterrupted_weights(recipe_run, tiny, tmp_path):
    reference = recipe_run[0] / "distill"
    out = tmp_path / "run"
    upstream(tiny, out)
    # The command `quill run` gives the stage, so the killed stage's settings equal the reference run's.
    plan = plan_recipe(load_recipe(REPO / "recipes" / "tiny-distill"), out, from_stage="distill", overrides=CI)
    cmd = stage_command(plan[0])
    kill_after_checkpoint(cmd, tiny["env"], out / "distill")
    proc = run_ok(cmd, tiny["env"])
    assert "distill: resuming from" in proc.stderr
    assert is_done(out / "distill") and not (out / "distill" / "checkpoints").exists()
    assert_same_weights(reference, out / "distill")


# -- a planted teacher, in this process (to hold the teacher object the stage trained against) -------------------


def test_student_learns_a_planted_teacher_whose_weights_stay_unchanged(tiny, tmp_path, monkeypatch):
    from quill.options import parse_stage_args
    from quill.stages import distill

    for key in ("QUILL_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, tiny["env"][key])
    tokenizer = load_tokenizer(str(tiny["tok"]))
    planted = torch.zeros(_padded_vocab(len(tokenizer)))
    planted[[40, 41, 42, 43]] = torch.tensor([8.0, 7.0, 6.0, 5.0])  # ~90% of the mass on four tokens
    teacher_dir = planted_teacher(tokenizer, tmp_path / "teacher", planted)
    student_dir = save_model(tiny_quill(tokenizer, seed=1), tokenizer, tmp_path / "student")
    teacher_hash = tree_hash(teacher_dir)

    loaded = []  # every model the stage loads with load_for_inference: the teacher, once
    real = distill.load_for_inference
    monkeypatch.setattr(distill, "load_for_inference", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    argv = [
        f"output_dir={tmp_path / 'out'}",
        f"model_name_or_path={student_dir}",
        f"teacher_model_name_or_path={teacher_dir}",
        "dataset_mixture=[{path: quill:default/rl_train, max_samples: 64}]",  # prompt rows (the recipe: messages)
        "per_device_train_batch_size=8",
        "max_completion_length=8",
        "max_steps=20",
        "learning_rate=2e-2",
        "save_steps=100",
        "logging_steps=4",
        "use_cpu=true",
        "bf16=false",
        "gradient_checkpointing=false",
        "report_to=none",
        "disable_tqdm=true",
    ]
    distill.train(*parse_stage_args(distill.ARG_TYPES, argv))

    # The student's next-token distribution moved toward softmax(PLANTED) on held-out prompts.
    prompts = [[{"role": "user", "content": f"Reverse this list of words: {w}, sky, {i}"}] for i, w in
               enumerate(["red", "sun", "old", "tree", "cold", "wind"])]  # fmt: skip
    target = torch.log_softmax(planted, dim=-1)

    def kl_to_teacher(folder) -> float:
        model = QuillForCausalLM.from_pretrained(folder).eval()
        student = next_token_log_probs(model, tokenizer, prompts)
        return torch.sum(target.exp() * (target - student), dim=-1).mean().item()

    before, after = kl_to_teacher(student_dir), kl_to_teacher(tmp_path / "out")
    assert after < 0.3 * before, (before, after)

    # One teacher, in eval mode, its weights exactly the planted ones after training; its folder untouched.
    assert len(loaded) == 1 and not loaded[0].training
    teacher_log_probs = next_token_log_probs(loaded[0], tokenizer, prompts)
    assert torch.allclose(teacher_log_probs, target.expand(len(prompts), -1), atol=1e-3)
    saved = load_file(str(teacher_dir / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in loaded[0].state_dict().items() if k in saved)
    assert tree_hash(teacher_dir) == teacher_hash


def test_teacher_with_another_vocabulary_is_refused_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    from quill.stages import distill

    for key in ("QUILL_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, tiny["env"][key])
    tokenizer = load_tokenizer(str(tiny["tok"]))
    other = train_tokenizer(["a teacher trained on other text, with other merges"] * 50, vocab_size=300)
    teacher_dir = save_model(tiny_quill(other, seed=0), other, tmp_path / "teacher")
    student_dir = save_model(tiny_quill(tokenizer, seed=1), tokenizer, tmp_path / "student")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        distill.main([f"output_dir={out}", f"model_name_or_path={student_dir}",
                      f"teacher_model_name_or_path={teacher_dir}", "use_cpu=true", "bf16=false",
                      "dataset_mixture=[{path: quill:default/sft_train, max_samples: 16}]"])  # fmt: skip
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not share the student's vocabulary" in errors[0], errors
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()
