"""Instruction tuning with TRL's SFTTrainer: loss on assistant tokens only, packed without cross-document attention.

    quill sft --config recipes/tiny/sft.yaml [key=value ...]

TRL's BFD packing emits padding-free rows with restarting position_ids; Quill's packed SDPA backend keeps each
conversation's attention to itself (stock sdpa would need an LxL mask, or leak if a cache is live). After training
`generation_config.eos_token_id` is set to [<|end|>, eos] so `pipeline()` stops at the end of the assistant turn.
"""

from trl import SFTConfig, SFTTrainer

from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.errors import run_guarded
from quill.heldout import EvalArguments, compare_to_start
from quill.options import parse_stage_args
from quill.stages.common import load_stage_data, load_task_eval, report_overlong, run_stage, start_stage
from quill.stages.distributed import eval_loss

ARG_TYPES = (DataArguments, ModelArguments, SFTConfig, OutputArguments, EvalArguments)


def train(
    data_args: DataArguments,
    model_args: ModelArguments,
    args: SFTConfig,
    output: OutputArguments,
    eval_args: EvalArguments,
) -> dict:
    stage = start_stage("sft", data_args, model_args, args, output)
    if stage.skipped:
        return stage.metrics
    splits = load_stage_data(data_args, "sft")
    report_overlong("sft", splits["train"], stage.tokenizer, args.max_length)
    task_rows = load_task_eval(data_args)
    trainer = SFTTrainer(
        model=stage.model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"] if len(splits["eval"]) else None,  # eval_size: 0 -> no eval split (TRL
        # cannot prepare an empty one)
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        metrics = {"eval_loss": eval_loss(trainer)} if trainer.eval_dataset is not None else {}
        if task_rows:
            metrics.update(eval_args.evaluate(trainer.model, stage.tokenizer, task_rows, seed=args.seed))
        return metrics

    return run_stage(stage, trainer, evaluate, datasets=data_args.names(), compare=compare_to_start(task_rows))


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
