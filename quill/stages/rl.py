"""Online RL (the RLHF branch) with TRL's GRPOTrainer, starting from the SFT model.

    quill rl --config recipes/tiny/rl.yaml [reward_model_path=OUT/reward] [key=value ...]

Rewards: the reward model trained by the `reward` stage (`reward_model_path`) and/or the tasks' own verifiable
scorers (`verifiable_reward: true`, reasoning-gym's `score_answer`). GRPO samples `num_generations` completions per
prompt and pushes the policy toward the better-than-average ones; no value model is needed.
"""

import math
from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer

from quill.arguments import DataArguments, ModelArguments, RunArguments
from quill.data.tasks import reward_fn
from quill.errors import QuillError, run_guarded
from quill.loading import check_model_path
from quill.metrics import task_accuracy
from quill.options import parse_stage_args
from quill.stages.common import load_stage_data, load_task_eval, run_stage, start_stage


@dataclass
class RLConfig(GRPOConfig):
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward-model folder or Hub id (the reward stage's output)."}
    )
    verifiable_reward: bool = field(default=True, metadata={"help": "Also reward with each task's own answer scorer."})

    def __post_init__(self):
        super().__post_init__()
        # GRPO trains on a buffer of completions generated every `period` optimizer steps; the buffer is not part of
        # a checkpoint, so a checkpoint inside it would resume into a different run than the uninterrupted one.
        period = self.steps_per_generation * self.num_iterations / self.gradient_accumulation_steps
        if self.save_strategy == "steps" and period > 1 and self.save_steps >= 1 and self.save_steps % period:
            aligned = int(math.ceil(self.save_steps / period) * period)
            raise QuillError(
                f"save_steps={self.save_steps:g} would checkpoint inside a GRPO generation buffer, which spans "
                f"{period:g} optimizer steps (steps_per_generation x num_iterations / gradient_accumulation_steps), "
                "so a resume would not continue the same run",
                f"set save_steps to a multiple of {period:g}, e.g. save_steps: {aligned}",
            )


ARG_TYPES = (DataArguments, ModelArguments, RLConfig, RunArguments)


def task_reward(completions, **columns) -> list[float]:
    return reward_fn(completions, **columns)


def reward_functions(args: RLConfig) -> list:
    funcs = []
    if args.reward_model_path:
        check_model_path(args.reward_model_path)
        funcs.append(args.reward_model_path)  # GRPO loads it as AutoModelForSequenceClassification(num_labels=1)
    if args.verifiable_reward:
        funcs.append(task_reward)
    if not funcs:
        raise QuillError("rl: no reward given", fix="set reward_model_path and/or verifiable_reward: true")
    return funcs


def train(data_args: DataArguments, model_args: ModelArguments, args: RLConfig, run: RunArguments) -> dict:
    stage = start_stage("rl", data_args, model_args, args, run)
    if stage.skipped:
        return stage.metrics
    splits = load_stage_data(data_args, "rl")
    task_rows = load_task_eval(data_args) or list(splits["eval"])
    if args.reward_model_path:
        args.model_init_kwargs = {**(args.model_init_kwargs or {}), "trust_remote_code": model_args.trust_remote_code}
    trainer = GRPOTrainer(
        model=stage.model,
        args=args,
        reward_funcs=reward_functions(args),
        train_dataset=splits["train"],
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        return task_accuracy(trainer.model, stage.tokenizer, task_rows)

    return run_stage(stage, trainer, evaluate, datasets=data_args.names())


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
