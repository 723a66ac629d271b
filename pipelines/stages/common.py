"""What every training stage does around its trainer: lock, load, guard, resume, evaluate, finish, push.

A stage file builds its datasets and its (TRL or HF) trainer; everything before and after is here:

    stage = start_stage("sft", data_args, model_args, args, output)   # lock, skip check, tokenizer, model, LoRA
    trainer = SFTTrainer(model=stage.model, args=args, ..., callbacks=stage.callbacks, peft_config=stage.peft_config)
    return run_stage(stage, trainer, evaluate, datasets=...)  # resume, train, eval, finished folder, marker, push
"""

import contextlib
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from safetensors import SafetensorError
from transformers import TrainerCallback, set_seed

from quill.allocator import keep_freed_memory
from quill.data.pairs import policy_pairs
from quill.data.schemas import check_schema
from quill.data.sources import load_mixture, load_source, load_stream, stream_eval_count
from quill.data.tokenizer import stop_token_ids
from quill.errors import QuillError, one_line
from quill.hub import model_card, push_folder
from quill.loading import CAUSAL_LM, load_model, load_tokenizer, peft_config
from quill.output import (
    CHECKPOINTS,
    MARKER,
    check_finished,
    clear_for_overwrite,
    disk_error,
    fingerprint,
    finish_folder,
    folder_lock,
    prepare_run_dir,
    read_json,
    record_fingerprint,
    recover,
    resume_point,
    staged_path,
    write_json,
)
from quill.stages.distributed import enable_fsdp_on_cpu, save_full_model, watch_ranks
from quill.stages.guards import CheckpointHygiene, StopOnNonFiniteLoss, StopOnPreemption, exit_if_preempted
from quill.stages.tracking import configure_tracking
from quill.stats import paired_difference

# TRL's configs default gradient_checkpointing=True, which transformers 5 flags as deprecated on every TRL stage
# start; that warning would break the one-line `error: ...` contract on stderr.
warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)


def is_main_process() -> bool:
    """Accelerate's answer, launched or not (a plain `python -m` run is its main process). ACCELERATE_USE_CPU is passed
    as Accelerator and Trainer do, so a CPU launch on a GPU machine does not set up a GPU process group first."""
    from accelerate.state import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).is_main_process


def log(msg: str) -> None:
    if is_main_process():
        print(f"[quill] {msg}", file=sys.stderr, flush=True)


# -- paired_with: another finished model scored on this stage's held-out rows (classify, qa, seq2seq) --------------


def finished_folder(name: str, output_dir: Path) -> Path:
    """`paired_with`: a stage name of this run (a sibling of output_dir) or a folder; it must hold a finished model."""
    folder = output_dir.parent / name if "/" not in name else Path(name)
    if not (folder / MARKER).is_file():
        raise QuillError(
            f"paired_with: '{name}' is not a finished stage ({folder} has no {MARKER})",
            "run that stage first (list it earlier in the recipe), or point paired_with at a finished folder",
        )
    return folder


def versus(stage: str, metric: str, other: str, theirs: list, ours: list) -> dict:
    """This model minus the `paired_with` model on the same held-out rows (per-row correctness, quill.stats), logged
    and recorded as `<metric>_vs_<other>_*`, which the report's lead table shows."""
    result = paired_difference(theirs, ours)
    log(f"{stage}: {metric.replace('_', ' ')} {result.after:.3f} vs {other} {result.before:.3f}: {result.diff:+.3f} "
        f"(95% CI {result.low:+.3f}..{result.high:+.3f}, p={result.p_value:.2g}, {result.verdict})")  # fmt: skip
    return result.as_metrics(f"{metric}_vs_{other}")


@dataclass
class Stage:
    name: str
    output_dir: Path
    model_args: object
    args: object  # the stage's TrainingArguments (or TRL config)
    output: object  # OutputArguments
    fingerprint: dict
    tokenizer: object = None
    model: object = None
    peft_config: object = None
    callbacks: list = field(default_factory=list)
    started: float = field(default_factory=time.time)
    skipped: bool = False
    metrics: dict = field(default_factory=dict)
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the folder lock, for the process


def open_stage(name: str, parsed: tuple, output) -> tuple[Path, dict, contextlib.ExitStack, dict | None]:
    """Lock the output folder, finish an interrupted swap, and look for a finished run with the same settings.
    Returns (folder, fingerprint, the lock's ExitStack, the finished marker or None)."""
    fp = fingerprint(parsed)  # before anything below changes the arguments
    out = Path(output.output_dir or f"outputs/{name}")
    held = contextlib.ExitStack()
    if is_main_process():
        prepare_run_dir(out.parent)
        held.enter_context(folder_lock(out))
        recover(out)  # before anything creates `out`: a swap cut short must be completed, not overwritten
        prepare_run_dir(out)
    finished = None if output.overwrite else check_finished(out, fp, name)
    if finished:
        log(f"{name}: already finished in {out} with the same settings; skipping (overwrite=true redoes it)")
    return out, fp, held, finished


def start_stage(name, data_args, model_args, args, output, task: str = CAUSAL_LM) -> Stage:
    out, fp, held, finished = open_stage(name, (data_args, model_args, args, output), output)
    stage = Stage(name=name, output_dir=out, model_args=model_args, args=args, output=output, fingerprint=fp, held=held)
    if finished:
        stage.skipped, stage.metrics = True, read_json(out / "metrics.json")
        if output.push_to_hub and is_main_process():  # e.g. a push cut off last time: the Hub gets only what it lacks
            push_stage(out, output, name)
        return stage
    args.output_dir = str(out / CHECKPOINTS)  # resume points; the stage folder itself only ever holds a final model
    args.push_to_hub = False  # the finished folder is pushed once, by run_stage, not every checkpoint mid-run
    args.logging_nan_inf_filter = False  # a NaN must be seen, not averaged away
    args.include_num_input_tokens_seen = "all"  # tokens seen and throughput go into the report card
    configure_tracking(args, out)  # report_to: one project per `quill run`, a run per stage
    set_seed(args.seed)
    enable_fsdp_on_cpu()  # before the trainer builds its Accelerator; only under a CPU launch with an FSDP config
    if args.use_cpu or not torch.cuda.is_available():
        keep_freed_memory()  # each step reuses the last one's pages (pipelines/allocator.py)
    tokenizer_path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if not tokenizer_path:
        raise QuillError(f"{name}: no tokenizer given", "set tokenizer_name_or_path (or model_name_or_path)")
    stage.tokenizer = load_tokenizer(
        tokenizer_path,
        model_args.trust_remote_code,
        model_args.model_revision if tokenizer_path == model_args.model_name_or_path else None,
    )
    try:
        stage.model = load_model(model_args, stage.tokenizer, task=task)
    except SafetensorError as err:  # a truncated/corrupted model.safetensors is not an OSError
        raise QuillError(
            f"model '{model_args.model_name_or_path}' has a corrupted weights file ({one_line(err, 160)})",
            "restore the model folder, or re-run the stage that wrote it with overwrite=true",
        ) from None
    stage.peft_config = peft_config(model_args, task)
    stage.callbacks = [StopOnNonFiniteLoss(), CheckpointHygiene(), StopOnPreemption(name)]
    return stage


def load_stage_data(data_args, schema: str):
    """The stage's mixture with its held-out split, every source checked against the stage's schema first."""
    sources = data_args.sources()
    for src in sources:
        src.path = data_args.resolve(src.path)
    return load_mixture(sources, seed=data_args.dataset_seed, eval_size=data_args.eval_size, stage=schema)


def pair_source(stage: str, data_args, args) -> str:
    """'dataset' or 'policy': where a DPO or reward stage gets its pairs. `pairs_from: auto` lets the data decide:
    sources with chosen and rejected columns are pairs to train on, as TRL users expect; prompt rows are answered by
    the start model and labelled (the default data's rl_train). Sets args.pairs_from and says in the log."""
    if args.pairs_from != "auto":
        return args.pairs_from
    columns = [set(load_source({**entry, "path": data_args.resolve(entry["path"])}).column_names)
               for entry in data_args.dataset_mixture]  # fmt: skip
    if columns and all({"chosen", "rejected"} <= c for c in columns):
        args.pairs_from = "dataset"
        log(f"{stage}: training on the dataset's chosen/rejected pairs (pairs_from: auto; the data has those columns)")
    else:
        args.pairs_from = "policy"
        log(f"{stage}: building pairs from the start model's own answers to the dataset's prompts, labelled by "
            f"the {args.pair_labeller} (pairs_from: auto; the data has no chosen/rejected columns)")  # fmt: skip
    return args.pairs_from


def preference_data(stage: str, data_args, args, policy, tokenizer, model_args):
    """(train set, held-out pairs, pair metrics) for a DPO or reward stage: the dataset's chosen/rejected pairs, or
    with `pairs_from: policy` pairs built now from `policy`'s own answers to the dataset's prompts."""
    if pair_source(stage, data_args, args) != "policy":
        splits = load_stage_data(data_args, stage)
        return splits["train"], list(splits["eval"]), {}
    try:
        splits = load_stage_data(data_args, "rl")  # prompt rows {prompt, task, answer, metadata}
    except QuillError as e:
        raise QuillError(
            f"{stage} with pairs_from: policy builds pairs from prompts, and {e.problem}",
            "give prompt rows (as quill:default/rl_train has), or set pairs_from: dataset for chosen/rejected pairs",
        ) from None
    train_pairs, eval_pairs, stats = policy_pairs(
        stage, policy, tokenizer, splits, args, model_args.trust_remote_code, model_args=model_args
    )
    log(f"{stage}: {stats.describe()}")
    return Dataset.from_list(train_pairs), eval_pairs, stats.as_metrics()


def load_stage_stream(data_args, schema: str):
    """(held-out rows, a function that opens the training stream) for a streamed stage.

    The main process checks the sources and reads the held-out rows (the stream's first `eval_size` rows); the
    other processes receive them from it rather than reading the source too. The training stream (the rows after
    the held-out ones) opens when first read, which under accelerate's dispatcher is on the main process only."""
    from accelerate.state import PartialState

    sources = data_args.sources()
    for src in sources:
        src.path = data_args.resolve(src.path)
    n_eval = stream_eval_count(data_args.eval_size)
    state = PartialState()
    payload = None
    if state.is_main_process:
        try:
            held_out = list(load_stream(sources, seed=data_args.dataset_seed, stage=schema).take(n_eval))
            if len(held_out) < n_eval:
                raise QuillError(
                    f"data mixture: eval_size is {n_eval} rows, but the stream holds only {len(held_out)}",
                    "lower eval_size or raise max_samples",
                )
            payload = {"rows": held_out}
        except QuillError as err:  # the other processes wait for this payload: tell them, then stop together
            payload = {"error": [err.problem, err.fix]}
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        payload = broadcast_object_list([payload])[0]
    if "error" in payload:
        raise QuillError(*payload["error"])
    return payload["rows"], lambda: load_stream(sources, seed=data_args.dataset_seed).skip(n_eval)


def load_task_eval(data_args) -> list[dict]:
    """Held-out task rows ({prompt, task, answer, metadata}) for the accuracy a chat model is judged by."""
    if not getattr(data_args, "task_eval", None):
        return []
    source = {**data_args.task_eval, "path": data_args.resolve(data_args.task_eval["path"])}
    rows = load_mixture([source], seed=data_args.dataset_seed, eval_size=0)["train"]
    check_schema(rows, "rl", source=f"task_eval {data_args.task_eval['path']}")
    return list(rows)[: data_args.task_eval_limit or None]


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
    """TRL truncates samples longer than max_length; we count them and say so, never silently."""
    if not max_length:
        return 0
    checked = min(len(dataset), OVERLONG_CHECK_ROWS)
    over = sum(sample_length(tokenizer, row) > max_length for row in dataset.select(range(checked)))
    if over:
        log(
            f"{name}: {over} of {checked} training samples checked are longer than max_length={max_length} tokens "
            "and will be truncated (raise max_length to keep them whole)"
        )
    return over


# -- evaluating before training --------------------------------------------------------------------------------


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
            write_json(self.path, self.metrics)


# -- running and finishing ---------------------------------------------------------------------------------------


def run_stage(stage: Stage, trainer, evaluate, datasets: list[str], compare=None) -> dict:
    """Resume or start, train, evaluate, then write the finished folder. `evaluate()` returns the stage's metrics;
    `compare(before, after)`, if given, returns metrics relating the two (e.g. paired differences). Keys starting
    with `_` (per-example results kept for `compare`) are not saved."""
    out, main = stage.output_dir, trainer.accelerator.is_main_process
    with stage.held:
        if stage.output.overwrite and main:
            clear_for_overwrite(out)  # only now: every input has been loaded and checked
        resume = resume_point(out, stage.fingerprint, stage.name, clean=main)
        if main and not resume:
            record_fingerprint(out, stage.fingerprint)
        trainer.accelerator.wait_for_everyone()
        before = EvaluateBeforeTraining(evaluate, out / CHECKPOINTS / "metrics_before.json")
        if resume:
            log(f"{stage.name}: resuming from {resume}")
            before.metrics = read_json(before.path)
        else:
            trainer.add_callback(before)
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, StopOnNonFiniteLoss):
                callback.attach(trainer)  # the loss check sits around the trainer's backward pass
        watch_ranks(trainer)  # a rank that dies is named, and collectives give up after ddp_timeout
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        except OSError as err:
            raise disk_error(err, out / CHECKPOINTS) from err
        exit_if_preempted(trainer)  # SIGTERM/SIGUSR1 stopped it at a saved checkpoint: exit 75, saying how to resume
        after = evaluate()
        metrics = {**before.metrics, **after, **(compare(before.metrics, after) if compare else {})}
        metrics = {k: v for k, v in metrics.items() if not k.startswith("_")} | run_summary(stage, trainer, result)
        finish_stage(stage, trainer, metrics, datasets)
    log(f"{stage.name}: done in {time.time() - stage.started:.0f}s -> {out} " + format_metrics(metrics))
    if stage.output.push_to_hub and main:
        push_stage(stage.output_dir, stage.output, stage.name)
    return metrics


def push_stage(folder: Path, output, name: str) -> None:
    url = push_folder(folder, output.hub_model_id or folder.name, output.hub_private_repo, output.hub_revision)
    log(f"{name}: pushed to {url}")


def finish_stage(stage: Stage, trainer, metrics: dict, datasets: list[str]) -> None:
    """Save the final model (every process: sharded models are gathered), then, on the main process, complete the
    finished folder beside the stage folder and swap it in (quill.output.finish_folder)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    if getattr(base, "generation_config", None) is not None:
        sync_generation_config(base, stage.tokenizer)
    staged, main = staged_path(stage.output_dir), trainer.accelerator.is_main_process
    if main:
        staged.mkdir(parents=True, exist_ok=True)
    trainer.accelerator.wait_for_everyone()
    try:
        if hasattr(model, "peft_config") and stage.model_args.merge_lora_on_save:
            if main:
                model.merge_and_unload().save_pretrained(staged)
        else:
            save_full_model(trainer, staged)  # gathers FSDP/ZeRO-3 shards; writes on the main process only
    except BaseException as err:
        if main:
            shutil.rmtree(staged, ignore_errors=True)  # no half-written folder left behind
        raise disk_error(err, staged) if isinstance(err, OSError) else err from err

    def write_rest(folder: Path) -> None:
        stage.tokenizer.save_pretrained(folder)
        (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle
        log_history = [{k: v for k, v in row.items() if _finite(v)} for row in trainer.state.log_history]
        write_json(folder / "training_log.json", log_history)
        write_json(folder / "metrics.json", metrics)
        card = model_card(
            stage=stage.name,
            base_model=stage.model_args.model_name_or_path,
            datasets=datasets,
            metrics=metrics,
            hub_model_id=stage.output.hub_model_id,
            classifier=not hasattr(base, "generation_config") or base.generation_config is None,
        )
        (folder / "README.md").write_text(card, encoding="utf-8")

    if main:
        base_model = stage.model_args.model_name_or_path
        if base_model and Path(base_model).exists():
            base_model = str(Path(base_model).resolve())  # markers are never pushed: a local path is fine here
        finish_folder(
            stage.output_dir,
            write_rest,
            {"stage": stage.name, "base_model": base_model, "fingerprint": stage.fingerprint},
        )
    trainer.accelerator.wait_for_everyone()


def sync_generation_config(model, tokenizer) -> None:
    """Make `pipeline()` stop at the end of an assistant turn: eos = [<|end|>, eos] (TRL leaves only eos there)."""
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)


def run_summary(stage: Stage, trainer, result) -> dict:
    """Cost figures for the report card: time, tokens, throughput, memory, hardware."""
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    runtime = result.metrics.get("train_runtime")
    summary = {
        "train_loss": result.training_loss,
        "train_steps": trainer.state.global_step,
        "wall_seconds": round(time.time() - stage.started, 1),
        "train_runtime": runtime,
        "tokens_seen": tokens,
        "world_size": trainer.args.world_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if tokens and runtime:
        summary["tokens_per_second"] = round(tokens / runtime, 1)
    summary["peak_memory_mb"] = round(peak_memory_mb(), 1)
    return summary


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def format_metrics(metrics: dict) -> str:
    keys = [k for k in metrics if k.startswith("eval_") or k.endswith("accuracy") or k.endswith("_before")]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics[k], (int, float)))


def _finite(v) -> bool:
    return not (isinstance(v, float) and not math.isfinite(v))
