"""What every training stage does around its trainer: load, guard, resume, evaluate, write, push.

A stage file builds its datasets and its (TRL or HF) trainer; everything before and after is here:

    stage = start_stage("sft", data_args, model_args, args)   # tokenizer, model, LoRA, callbacks, output folder
    trainer = SFTTrainer(model=stage.model, args=args, ..., callbacks=stage.callbacks, peft_config=stage.peft_config)
    return run_stage(stage, trainer, evaluate, datasets=...)  # resume, train, eval, Hub-format folder, marker, push
"""

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import TrainerCallback, set_seed

from quill.allocator import keep_freed_memory
from quill.checkpoint import (
    CHECKPOINTS,
    StopOnNonFiniteLoss,
    finish_stage,
    last_complete_checkpoint,
    prepare_output_dir,
    push_folder,
)
from quill.data import builtin
from quill.data.schemas import check_schema
from quill.data.sources import load_mixture
from quill.errors import QuillError
from quill.markers import is_stage_done
from quill.models import load_model, load_tokenizer, read_json

# TRL's configs default gradient_checkpointing=True, which transformers 5 flags as deprecated on every TRL stage
# start; that warning would break the one-line `error: ...` contract of run_guarded on stderr.
warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)


@dataclass
class Stage:
    name: str
    output_dir: Path
    model_args: object
    args: object
    tokenizer: object = None
    model: object = None
    peft_config: object = None
    callbacks: list = field(default_factory=list)
    hub_model_id: str | None = None
    started: float = field(default_factory=time.time)
    skipped: bool = False
    metrics: dict = field(default_factory=dict)


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[quill] {msg}", file=sys.stderr, flush=True)


def start_stage(name, data_args, model_args, args, run, task: str = "causal-lm") -> Stage:
    out = prepare_output_dir(args.output_dir, overwrite=run.overwrite)
    stage = Stage(name=name, output_dir=out, model_args=model_args, args=args)
    if is_stage_done(out):
        log(f"{name}: already finished in {out}; skipping (set overwrite=true to redo it)")
        stage.skipped, stage.metrics = True, read_json(out / "metrics.json")
        return stage
    # The Trainer writes resume points under checkpoints/; the stage folder itself only ever holds a final model.
    args.output_dir = str(out / CHECKPOINTS)
    # We push the finished folder ourselves (with retries), not every checkpoint mid-run.
    if args.push_to_hub:
        stage.hub_model_id = args.hub_model_id or out.name
        args.push_to_hub = False
    args.logging_nan_inf_filter = False  # a NaN must be seen, not averaged away
    args.include_num_input_tokens_seen = "all"  # tokens seen and throughput go into the report card
    set_seed(args.seed)
    if args.use_cpu or not torch.cuda.is_available():
        keep_freed_memory()  # each step reuses the last one's pages (quill/allocator.py); no log: stderr is for errors
    tokenizer_path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if not tokenizer_path:
        raise QuillError(f"{name}: no tokenizer given", fix="set tokenizer_name_or_path (or model_name_or_path)")
    stage.tokenizer = load_tokenizer(tokenizer_path, model_args.trust_remote_code)
    try:
        stage.model = load_model(model_args, stage.tokenizer, task=task)
    except SafetensorError as err:  # a truncated/corrupted model.safetensors is not an OSError
        raise QuillError(f"model '{model_args.model_name_or_path}' has a corrupted weights file "
                         f"({' '.join(str(err).split())[:160]})",
                         fix="restore the model folder, or re-run the stage that wrote it with overwrite=true") from None
    stage.peft_config = peft_config(model_args, task)
    stage.callbacks = [StopOnNonFiniteLoss()]
    return stage


def peft_config(model_args, task: str):
    if not getattr(model_args, "use_peft", False):
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        task_type="SEQ_CLS" if task != "causal-lm" else "CAUSAL_LM",
    )


def load_stage_data(data_args, schema: str):
    """The stage's mixture with its held-out split, every source checked against the stage's schema first."""
    sources = data_args.sources()
    for src in sources:
        src.path = builtin.resolve(src.path)
    # Each source is checked under its own path before mixing, so an error names the file and row.
    return load_mixture(sources, seed=data_args.dataset_seed, eval_size=data_args.eval_size, stage=schema)


OVERLONG_CHECK_ROWS = 20_000  # enough to tell a user their max_length is wrong, cheap on any dataset


def sample_length(tokenizer, row: dict) -> int:
    """Tokens of the longest sequence a trainer builds from this row (prompt + completion / chosen / rejected)."""
    def tokens(x) -> int:
        if isinstance(x, list):
            return len(tokenizer.apply_chat_template(x, tokenize=True, return_dict=False))
        return len(tokenizer(x, add_special_tokens=False)["input_ids"])

    if "messages" in row:
        return tokens(row["messages"])
    prompt = row.get("prompt") or ([] if isinstance(row.get("chosen", row.get("completion")), list) else "")
    answers = [row[k] for k in ("completion", "chosen", "rejected") if k in row] or [prompt[:0]]
    return max(tokens(prompt + a) if isinstance(a, list) else tokens(prompt) + tokens(a) for a in answers)


def report_overlong(name: str, dataset, tokenizer, max_length: int | None) -> int:
    """Quill's policy for samples longer than max_length: TRL truncates them; we count and say so, never silently."""
    if not max_length:
        return 0
    checked = min(len(dataset), OVERLONG_CHECK_ROWS)
    over = sum(sample_length(tokenizer, row) > max_length for row in dataset.select(range(checked)))
    if over:
        log(f"{name}: {over} of {checked} training samples checked are longer than max_length={max_length} tokens "
            "and will be truncated (raise max_length to keep them whole)")
    return over


def load_task_eval(data_args) -> list[dict]:
    """Held-out task rows ({prompt, task, answer, metadata}) for the accuracy a chat model is judged by."""
    if not getattr(data_args, "task_eval", None):
        return []
    source = {**data_args.task_eval, "path": builtin.resolve(data_args.task_eval["path"])}
    rows = load_mixture([source], seed=data_args.dataset_seed, eval_size=0)["train"]
    check_schema(rows, "rl", source=f"task_eval {data_args.task_eval}")
    return list(rows)[: data_args.task_eval_limit or None]


class EvaluateBeforeTraining(TrainerCallback):
    """The stage's metrics on the starting model, taken once training has begun.

    Calling `trainer.evaluate()` before `trainer.train()` makes the Trainer prepare the model for evaluation only,
    and train() then reuses it without the DistributedDataParallel wrapper: every rank would train on its own
    gradients. At `on_train_begin` the model is already wrapped and nothing has been updated yet.
    """

    def __init__(self, evaluate, path: Path):
        self.evaluate, self.path, self.metrics = evaluate, path, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.metrics = {f"{k}_before": v for k, v in self.evaluate().items()}
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.metrics))


def run_stage(stage: Stage, trainer, evaluate, datasets: list[str]) -> dict:
    """Resume or start, train, evaluate, then write the finished folder. `evaluate()` returns the stage's metrics."""
    out = stage.output_dir
    resume = last_complete_checkpoint(out)
    before = EvaluateBeforeTraining(evaluate, out / CHECKPOINTS / "metrics_before.json")
    if resume:
        log(f"{stage.name}: resuming from {resume}")
        before.metrics = read_json(before.path)
    else:
        trainer.add_callback(before)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {**before.metrics, **evaluate()}
    metrics.update(run_summary(stage, trainer, result))
    card = {"base_model": stage.model_args.model_name_or_path, "datasets": datasets,
            "hub_model_id": stage.hub_model_id}
    finish_stage(trainer, stage.tokenizer, out, stage=stage.name, card=card, metrics=metrics,
                 merge_lora=getattr(stage.model_args, "merge_lora_on_save", False))
    log(f"{stage.name}: done in {time.time() - stage.started:.0f}s -> {out} " + format_metrics(metrics))
    if stage.hub_model_id and trainer.accelerator.is_main_process:
        url = push_folder(out, stage.hub_model_id, token=stage.args.hub_token)
        log(f"{stage.name}: pushed to {url}")
    return metrics


def run_summary(stage: Stage, trainer, result) -> dict:
    """Cost figures for the report card: time, tokens, throughput, memory, hardware."""
    seconds = time.time() - stage.started
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    summary = {
        "train_loss": result.training_loss,
        "train_steps": trainer.state.global_step,
        "wall_seconds": round(seconds, 1),
        "train_runtime": result.metrics.get("train_runtime"),
        "tokens_seen": tokens,
        "world_size": trainer.args.world_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if tokens and result.metrics.get("train_runtime"):
        summary["tokens_per_second"] = round(tokens / result.metrics["train_runtime"], 1)
    summary["peak_memory_mb"] = round(peak_memory_mb(), 1)
    return summary


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:
        return float("nan")


def format_metrics(metrics: dict) -> str:
    keys = [k for k in metrics if k.startswith("eval_") or k.endswith("accuracy") or k.endswith("_before")]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics[k], (int, float)))
