"""Knowledge distillation with TRL's DistillationTrainer: a student learns a teacher's next-token distribution.

    quill distill --config recipes/tiny-distill/distill.yaml teacher_model_name_or_path=OUT/sft [key=value ...]

On-policy (TRL's generalized JSD, arXiv:2306.13649): the student samples a completion for each prompt, and at every
completion token it is pulled toward the teacher's distribution there; `beta` picks the divergence (0 forward KL,
0.5 JSD, 1 reverse KL), `temperature` both the sampling and the softmax of the loss. The teacher is any causal LM
(folder or Hub id) with the student's vocabulary, loaded once per process on the training device in eval mode
(quill.loading.load_for_inference); only the student is trained, checkpointed and saved. The student is a model
folder (`model_name_or_path`) or a fresh Quill (`model_config`, e.g. half the teacher's depth).

Prompts: `prompt` rows (quill:default/rl_train), or conversations (`messages`, `prompt`/`completion`), whose last
assistant turn is held back. With `control: true` the stage also trains a copy of the start student with TRL's
SFTTrainer on those held-back answers (same prompts, batches and steps) and reports, paired on held-out prompts,
the distilled student against that control and against the teacher.
"""

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field

from transformers import AutoConfig, TrainingArguments
from trl import DistillationConfig, DistillationTrainer, SFTConfig, SFTTrainer

from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.data.sources import load_source
from quill.errors import QuillError, one_line, run_guarded
from quill.heldout import CORRECT, EvalArguments, compare_to_start, describe, paired_metrics
from quill.loading import check_model_path, load_for_inference, load_tokenizer
from quill.options import parse_stage_args
from quill.output import CHECKPOINTS, read_json, write_json
from quill.stages.common import (
    StopOnNonFiniteLoss,
    is_main_process,
    load_stage_data,
    load_task_eval,
    log,
    run_stage,
    start_stage,
    sync_generation_config,
)

# TRL's generation helper asks the student whether gradient checkpointing is on by a name transformers 5.24
# deprecates; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@dataclass
class DistillConfig(DistillationConfig):
    control: bool = field(
        default=False,
        metadata={
            "help": "Also train the start student with SFT on the data's answers to the same prompts (same batches "
            "and steps) and report the distilled student's paired held-out difference against it."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.teacher_model_name_or_path:
            raise QuillError("distill: no teacher given", "set teacher_model_name_or_path (a recipe: teacher: <stage>)")
        # The teacher is loaded by quill.loading with the stage's dtype and attention, not from these.
        for key in ("teacher_model_init_kwargs", "teacher_model_revision"):
            if getattr(self, key) is not None:
                raise QuillError(
                    f"{key} is not accepted: Quill loads the teacher itself, like every frozen helper model",
                    "drop it; dtype and attn_implementation apply to the teacher too, and a local folder pins it",
                )


ARG_TYPES = (DataArguments, ModelArguments, DistillConfig, OutputArguments, EvalArguments)


def load_teacher(path: str, student, tokenizer, model_args):
    """The teacher on the training device, in eval mode, once its vocabulary is checked against the student's."""
    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise QuillError(f"teacher '{path}' could not be loaded ({one_line(err, 200)})", "check the path") from None
    teacher_vocab, student_vocab = config.get_text_config().vocab_size, student.config.get_text_config().vocab_size
    fix = "distill from a teacher trained with the student's tokenizer (e.g. a stage of the same recipe)"
    try:
        teacher_tokens = load_tokenizer(path, model_args.trust_remote_code).get_vocab()
    except QuillError:  # a folder without tokenizer files: the ids must then be trusted to mean the same
        teacher_tokens = None
    if teacher_tokens is not None and teacher_tokens != tokenizer.get_vocab():
        differ = len(set(teacher_tokens.items()) ^ set(tokenizer.get_vocab().items())) // 2
        raise QuillError(
            f"teacher '{path}' does not share the student's vocabulary ({len(teacher_tokens)} vs {len(tokenizer)} "
            f"tokens, {differ} differ): distillation compares next-token distributions id by id",
            fix,
        )
    if teacher_vocab != student_vocab:
        if model_args.model_name_or_path or teacher_vocab < len(tokenizer):
            raise QuillError(
                f"teacher '{path}' scores {teacher_vocab} token ids but the student {student_vocab}: distillation "
                "compares next-token distributions id by id",
                fix,
            )
        # A fresh student takes the teacher's (padded) number of rows; its weights are random either way.
        log(f"distill: the fresh student's vocabulary rows follow the teacher's: {student_vocab} -> {teacher_vocab}")
        student.resize_token_embeddings(teacher_vocab, mean_resizing=False)
    return load_for_inference(path, model_args, "teacher", tokenizer)


def load_prompts(data_args, control: bool):
    """The mixture's train and eval splits, with a conversational `prompt`, plus `completion` (the data's answer)
    when the data has answers."""
    columns = [set(load_source({**e, "path": data_args.resolve(e["path"])}).column_names)
               for e in data_args.dataset_mixture]  # fmt: skip
    if not all(c & {"messages", "completion"} for c in columns):
        if control:
            raise QuillError(
                "distill: control: true trains SFT on the data's answers, but the data holds prompts only",
                "give conversations (messages, or prompt/completion; e.g. quill:default/sft_train), or control: false",
            )
        return load_stage_data(data_args, "rl")  # prompt rows, a string prompt made the user's turn
    splits = load_stage_data(data_args, "sft")
    if "messages" in splits["train"].column_names:

        def split_last_answer(row):
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            return {"prompt": row["messages"][:last], "completion": row["messages"][last : last + 1]}

        return splits.map(split_last_answer, remove_columns=["messages"])
    if isinstance(splits["train"][0]["prompt"], str):  # TRL applies the chat template only to message lists
        splits = splits.map(
            lambda r: {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
        )
    return splits


def cached(stage, name: str, compute) -> dict:
    """Metrics kept beside the checkpoints with the stage's fingerprint, so a resumed stage does not redo them."""
    path = stage.output_dir / CHECKPOINTS / f"{name}_metrics.json"
    saved = read_json(path)
    if not stage.output.overwrite and saved.pop("fingerprint", None) == stage.fingerprint and CORRECT in saved:
        return saved
    metrics = compute()
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**metrics, "fingerprint": stage.fingerprint})
    return metrics


def train_control(stage, args: DistillConfig, train_set, task_rows, eval_args) -> dict:
    """The start student trained by TRL's SFTTrainer on the held-back answers of the same prompts, with the
    distillation run's batches, steps, optimizer and schedule; its held-out metrics."""
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    shared |= {"output_dir": str(stage.output_dir / CHECKPOINTS / "control"), "save_strategy": "no"}
    shared |= {"report_to": "none", "push_to_hub": False, "hub_token": None, "eval_strategy": "no"}
    trainer = SFTTrainer(
        model=copy.deepcopy(stage.model),
        args=SFTConfig(**shared),
        train_dataset=train_set,
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=[StopOnNonFiniteLoss()],
    )
    log(f"distill: training the SFT control ({args.max_steps} steps on the same prompts' answers)")
    trainer.train()
    return eval_args.evaluate(trainer.model, stage.tokenizer, task_rows, seed=args.seed)


def train(
    data_args: DataArguments,
    model_args: ModelArguments,
    args: DistillConfig,
    output: OutputArguments,
    eval_args: EvalArguments,
) -> dict:
    if not (model_args.tokenizer_name_or_path or model_args.model_name_or_path):
        model_args.tokenizer_name_or_path = args.teacher_model_name_or_path  # a fresh student speaks the teacher's
    stage = start_stage("distill", data_args, model_args, args, output)
    if stage.skipped:
        return stage.metrics
    # The trainer counts prompt and completion tokens itself; the Trainer's count looks for input_ids and would warn.
    args.include_num_input_tokens_seen = "no"
    sync_generation_config(stage.model, stage.tokenizer)  # on-policy samples end at the end of the assistant turn
    teacher = load_teacher(args.teacher_model_name_or_path, stage.model, stage.tokenizer, model_args)
    splits = load_prompts(data_args, args.control)
    train_set = splits["train"]
    task_rows = load_task_eval(data_args)
    if args.control and not task_rows:
        raise QuillError("distill: control: true needs held-out prompts to compare on", "set task_eval")
    teacher_metrics, control = {}, {}
    if task_rows:  # the teacher's own held-out accuracy, on the same prompts
        teacher_metrics = cached(stage, "teacher", lambda: eval_args.evaluate(teacher, stage.tokenizer, task_rows))
    if args.control:
        control = cached(stage, "control", lambda: train_control(stage, args, train_set, task_rows, eval_args))
    trainer = DistillationTrainer(
        model=stage.model,
        teacher_model=teacher,
        args=args,
        train_dataset=train_set,
        eval_dataset=splits["eval"] if len(splits["eval"]) else None,  # TRL's on-policy divergence (eval_strategy)
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        return eval_args.evaluate(trainer.model, stage.tokenizer, task_rows, seed=args.seed) if task_rows else {}

    to_start = compare_to_start(task_rows)

    def compare(before: dict, after: dict) -> dict:
        out = to_start(before, after)
        for name, base in (("control", control), ("teacher", teacher_metrics)):
            if base and after.get(CORRECT):
                out.update({f"{name}_{k}": v for k, v in base.items() if k.endswith("accuracy")})
                out.update(paired_metrics(task_rows, base[CORRECT], after[CORRECT], prefix=f"vs_{name}_"))
        return out

    metrics = run_stage(stage, trainer, evaluate, datasets=data_args.names(), compare=compare)
    for prefix in ("task_accuracy", "vs_control_task_accuracy", "vs_teacher_task_accuracy"):
        if describe(metrics, prefix):
            log(f"distill: {describe(metrics, prefix)}")
    return metrics


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
