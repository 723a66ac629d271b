"""A tiny tokenizer and pretrained model, built once per test session, for the tests that drive stages by CLI.

The fault, bad-input and resume tests all need a finished upstream folder to start from; building it once
(~10 s) instead of once per file keeps the suite short.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "model_config={depth: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}"


# The small-run options the stage tests share (a later `key=value` in argv overrides an earlier one).
_RUN = ["save_steps=2", "logging_steps=1", "warmup_steps=0", "use_cpu=true", "dataloader_num_workers=0", "seed=0"]
PRETRAIN_OPTIONS = ["eval_size=10", "max_length=64", "per_device_train_batch_size=4", "max_steps=6", *_RUN]
SFT_OPTIONS = [
    "eval_size=10",
    "max_length=128",
    "task_eval_limit=4",
    "per_device_train_batch_size=4",
    "per_device_eval_batch_size=4",
    "max_steps=6",
    *_RUN,
    "bf16=false",
]


def stage_env(base: Path) -> dict:
    env = dict(
        os.environ,
        QUILL_CACHE=str(base / "quill_cache"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    env.pop("QUILL_DEBUG", None)  # progress bars (\r-redrawn lines) off: stderr then holds just the error line
    return env


def is_done(folder: Path) -> bool:
    return (folder / "quill_stage.json").exists()


def pretrain_argv(out: Path, tok: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "recipes/tiny/pretrain.yaml",
        f"output_dir={out}",
        f"tokenizer_name_or_path={tok}",
        TINY_MODEL,
        "dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 200}]",
        *PRETRAIN_OPTIONS,
        *extra,
    ]


def sft_argv(out: Path, model: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "recipes/tiny/sft.yaml",
        f"output_dir={out}",
        f"model_name_or_path={model}",
        "dataset_mixture=[{path: quill:default/sft_train, max_samples: 100}]",
        *SFT_OPTIONS,
        *extra,
    ]


def build_tiny(base: Path) -> dict:
    env = stage_env(base)
    tok, pre = base / "tiny" / "tokenizer", base / "tiny" / "pretrain"
    if not is_done(tok):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "quill.stages.tokenizer",
                "--config",
                "recipes/tiny/tokenizer.yaml",
                f"output_dir={tok}",
                "vocab_size=512",
                "dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 300}]",
                "eval_size=20",
            ],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
    if not is_done(pre):
        subprocess.run(
            [sys.executable, "-m", "quill.stages.pretrain", *pretrain_argv(pre, tok)],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
    return {"env": env, "tok": tok, "pre": pre}


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_quill(args: list[str], env: dict, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quill.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def preference_argv(stage: str, out: Path, model: Path, *extra: str) -> list[str]:
    """DPO or reward on a few of the default preference pairs, from the tiny SFT model."""
    return [
        "--config",
        f"recipes/tiny/{stage}.yaml",
        f"output_dir={out}",
        f"model_name_or_path={model}",
        "dataset_mixture=[{path: quill:default/dpo_train, max_samples: 48}]",
        "eval_size=8",
        "max_length=64",
        "per_device_train_batch_size=4",
        "per_device_eval_batch_size=8",
        "max_steps=6",
        *_RUN,
        "pairs_from=dataset",  # the fixed pairs: the recipe's on-policy pairs need prompts with answers
        *(["task_eval_limit=4", "control=false"] if stage == "dpo" else ["agreement_samples=0"]),
        *extra,
    ]


def rl_argv(out: Path, model: Path, reward_model: Path, *extra: str) -> list[str]:
    """GRPO with the tiny reward model's scores (they differ between samples, so the weights move), 2 steps per
    generation buffer, checkpoints on buffer boundaries."""
    return [
        "--config",
        "recipes/tiny/rl.yaml",
        f"output_dir={out}",
        f"model_name_or_path={model}",
        f"reward_model_path={reward_model}",
        "verifiable_reward=false",
        "reward_model_min_agreement=null",  # the tiny SFT model answers nothing right, so agreement is unmeasurable
        "dataset_mixture=[{path: quill:default/rl_train, max_samples: 48}]",
        "task_eval_limit=4",
        "num_generations=4",
        "generation_batch_size=8",
        "per_device_train_batch_size=4",
        "max_completion_length=8",
        "max_steps=6",
        *_RUN,
        *extra,
    ]


def stage_argv(stage: str, out: Path, tiny: dict, *extra: str) -> list[str]:
    """The small CLI arguments of each trainer stage, each starting from the shared tiny upstream folders."""
    if stage == "pretrain":
        return pretrain_argv(out, tiny["tok"], *extra)
    if stage == "sft":
        return sft_argv(out, tiny["pre"], *extra)
    if stage in ("dpo", "reward"):
        return preference_argv(stage, out, tiny["sft"], *extra)
    return rl_argv(out, tiny["sft"], tiny["reward"], *extra)


def build_post(base: Path, tiny: dict) -> dict:
    """The tiny SFT and reward folders (from build_tiny's pretrain), built once per session."""
    sft, reward = base / "tiny" / "sft", base / "tiny" / "reward"
    if not is_done(sft):
        subprocess.run([sys.executable, "-m", "quill.stages.sft", *sft_argv(sft, tiny["pre"])], cwd=REPO,
                       env=tiny["env"], check=True, capture_output=True)  # fmt: skip
    if not is_done(reward):
        subprocess.run([sys.executable, "-m", "quill.stages.reward", *preference_argv("reward", reward, sft)],
                       cwd=REPO, env=tiny["env"], check=True, capture_output=True)  # fmt: skip
    return {**tiny, "sft": sft, "reward": reward}


def add_fake_stage(folder: Path) -> None:
    """Copy tests/fake_stage.py (a stage that sleeps, crashes or fails on request) into a recipe folder."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).parent / "fake_stage.py", Path(folder) / "fake_stage.py")
