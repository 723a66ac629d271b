"""Preference tuning with TRL's DPOTrainer, starting from the SFT model, on fixed pairs or on the model's own mistakes.

    quill dpo --config recipes/tiny/dpo.yaml [key=value ...]

`pairs_from: dataset` trains on the dataset's chosen/rejected pairs. `pairs_from: policy` builds the pairs at stage
start from the start model's own answers to the dataset's prompts (quill.data.pairs): chosen = the answer the
labeller ranks best (the task scorer, a reward model or a judge model), rejected = the model's own answer it ranks
worst. Listing the stage again in a recipe (`{name: dpo2, stage: dpo, from: dpo}`) is the next round: its pairs
are rebuilt from the new model.

With `control: true` the stage also trains a copy of the start model with plain next-token loss on the same chosen
answers (TRL's `sft` loss, same batches, same steps) and reports DPO's paired difference against it: a gain that
more supervised training on the chosen answers would have bought as well is not DPO's.

Reference model, three ways (all TRL's own): a frozen copy of the starting model (default), its log-probs
precomputed once (`precompute_ref_log_probs: true`), or with `use_peft: true` the model with its adapter disabled.
The implicit-reward accuracy on held-out pairs is DPOTrainer's own `evaluate()`, against that same reference.
"""

import copy
from dataclasses import dataclass, field

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.data.pairs import PolicyPairArguments
from quill.errors import QuillError, run_guarded
from quill.heldout import CORRECT, EvalArguments, compare_to_start, describe, paired_metrics
from quill.metrics import preference_eval
from quill.options import parse_stage_args
from quill.output import CHECKPOINTS, read_json, write_json
from quill.stages.common import (
    StopOnNonFiniteLoss,
    is_main_process,
    load_task_eval,
    log,
    preference_data,
    report_overlong,
    run_stage,
    start_stage,
)


@dataclass
class QuillDPOConfig(DPOConfig, PolicyPairArguments):
    control: bool = field(
        default=False,
        metadata={
            "help": "Also train the start model with plain next-token loss on the same chosen answers (same batches "
            "and steps) and report DPO's paired held-out difference against that control."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_pairs()


ARG_TYPES = (DataArguments, ModelArguments, QuillDPOConfig, OutputArguments, EvalArguments)


def train_control(stage, args, train_set, task_rows, eval_args) -> dict:
    """The start model trained with next-token loss on the chosen answers only (TRL's `sft` loss type), on the
    same batches for the same steps; its held-out metrics, cached so a resumed stage does not train it again."""
    cache = stage.output_dir / CHECKPOINTS / "control_metrics.json"
    cached = read_json(cache)
    if not stage.output.overwrite and cached.pop("fingerprint", None) == stage.fingerprint and cached.get(CORRECT):
        return cached
    control_args = copy.deepcopy(args)
    control_args.loss_type, control_args.loss_weights = ["sft"], None
    control_args.output_dir = str(stage.output_dir / CHECKPOINTS / "control")
    control_args.save_strategy, control_args.report_to = "no", []
    model = copy.deepcopy(stage.model)
    trainer = DPOTrainer(
        model=model,
        args=control_args,
        train_dataset=train_set,
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=[StopOnNonFiniteLoss()],
    )
    log(f"{stage.name}: training the next-token control ({args.max_steps} steps on the same chosen answers)")
    trainer.train()
    metrics = eval_args.evaluate(trainer.model, stage.tokenizer, task_rows, seed=args.seed)
    if is_main_process():
        write_json(cache, {**metrics, "fingerprint": stage.fingerprint})
    return metrics


def train(
    data_args: DataArguments,
    model_args: ModelArguments,
    args: QuillDPOConfig,
    output: OutputArguments,
    eval_args: EvalArguments,
) -> dict:
    stage = start_stage("dpo", data_args, model_args, args, output)
    if stage.skipped:
        return stage.metrics
    task_rows = load_task_eval(data_args)
    train_set, eval_pairs, pair_metrics = preference_data(
        "dpo", data_args, args, stage.model, stage.tokenizer, model_args
    )
    report_overlong("dpo", train_set, stage.tokenizer, args.max_length)
    if args.control and not task_rows:
        raise QuillError("dpo: control: true needs held-out prompts to compare on", "set task_eval")
    control = train_control(stage, args, train_set, task_rows, eval_args) if args.control else {}
    trainer = DPOTrainer(
        model=stage.model,
        args=args,
        train_dataset=train_set,
        eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        metrics = dict(pair_metrics)
        if eval_pairs:
            metrics.update(preference_eval(trainer))
        if task_rows:
            metrics.update(eval_args.evaluate(trainer.model, stage.tokenizer, task_rows, seed=args.seed))
        return metrics

    to_start = compare_to_start(task_rows)

    def compare(before: dict, after: dict) -> dict:
        out = to_start(before, after)
        if control and after.get(CORRECT):
            out.update({f"control_{k}": v for k, v in control.items() if k.endswith("accuracy")})
            out.update(paired_metrics(task_rows, control[CORRECT], after[CORRECT], prefix="vs_control_"))
        return out

    metrics = run_stage(stage, trainer, evaluate, datasets=data_args.names(), compare=compare)
    for line in (describe(metrics), describe(metrics, "vs_control_task_accuracy")):
        if line:
            log(f"dpo: {line}")
    return metrics


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
