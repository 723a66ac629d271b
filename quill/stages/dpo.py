"""Preference tuning with TRL's DPOTrainer, starting from the SFT model.

    quill dpo --config recipes/tiny/dpo.yaml [key=value ...]

Reference model, three ways (all TRL's own): a frozen copy of the starting model (default), its log-probs
precomputed once (`precompute_ref_log_probs: true`, no second model in memory during training), or with
`use_peft: true` the same model with the LoRA adapter disabled.
"""

import copy

from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import DPOConfig, DPOTrainer

from quill.arguments import DataArguments, ModelArguments, RunArguments
from quill.errors import run_guarded
from quill.loading import load_model
from quill.metrics import dpo_preference_accuracy, task_accuracy
from quill.options import parse_stage_args
from quill.stages.common import load_stage_data, load_task_eval, report_overlong, run_stage, start_stage

ARG_TYPES = (DataArguments, ModelArguments, DPOConfig, RunArguments)


def train(data_args: DataArguments, model_args: ModelArguments, args: DPOConfig, run: RunArguments) -> dict:
    stage = start_stage("dpo", data_args, model_args, args, run)
    if stage.skipped:
        return stage.metrics
    splits = load_stage_data(data_args, "dpo")
    report_overlong("dpo", splits["train"], stage.tokenizer, args.max_length)
    task_rows = load_task_eval(data_args)
    # The starting model, frozen, for the implicit-reward metric (what DPO's "rewards/accuracies" measures). A copy
    # is taken now, before training changes the weights, only where TRL keeps no reference model of its own.
    zero3, peft = is_deepspeed_zero3_enabled(), stage.peft_config is not None
    start = copy.deepcopy(stage.model).eval() if args.precompute_ref_log_probs and not (zero3 or peft) else None
    pairs = list(splits["eval"])
    trainer = DPOTrainer(
        model=stage.model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=stage.callbacks,
    )

    reference = metric_reference(trainer, stage, start, zero3, peft)

    def evaluate() -> dict:
        metrics = dpo_preference_accuracy(trainer.model, reference, stage.tokenizer, pairs, beta=args.beta)
        if task_rows:
            metrics.update(task_accuracy(trainer.model, stage.tokenizer, task_rows))
        return metrics

    return run_stage(stage, trainer, evaluate, datasets=data_args.names())


def metric_reference(trainer, stage, start, zero3: bool, peft: bool):
    """The reference model for the metric, on the training device: TRL's own when it keeps one (prepared for
    DDP/FSDP/DeepSpeed, no second copy); None with LoRA (the policy with its adapter disabled); under ZeRO-3 with
    precomputed reference log-probs, the starting model loaded again as TRL loads its reference (a copy of
    partitioned weights would hold empty shards); else the copy taken before training, moved to the device."""
    if trainer.ref_model is not None:
        return trainer.ref_model
    if peft:
        return None
    if zero3:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(load_model(stage.model_args, stage.tokenizer), trainer.accelerator)
    return start.to(trainer.accelerator.device)


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
