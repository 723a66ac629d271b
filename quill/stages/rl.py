"""Online RL (the RLHF branch) with TRL's GRPOTrainer, starting from the SFT model.

    quill rl --config recipes/tiny/rl.yaml [reward_model_path=OUT/reward] [key=value ...]

Rewards: the reward model trained by the `reward` stage (`reward_model_path`) and/or the tasks' own verifiable
scorers (`verifiable_reward: true`, reasoning-gym's `score_answer`). GRPO samples `num_generations` completions per
prompt and pushes the policy toward the better-than-average ones; no value model is needed.
"""

from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer

from quill.config import DataArguments, ModelArguments, RunArguments, parse_stage_args
from quill.data.tasks import reward_fn
from quill.errors import QuillError
from quill.evaluation import task_accuracy
from quill.models import check_model_path
from quill.stages.common import load_stage_data, load_task_eval, run_stage, start_stage


@dataclass
class RLConfig(GRPOConfig):
    reward_model_path: str | None = field(default=None, metadata={"help": "Reward-model folder or Hub id (the reward stage's output)."})
    verifiable_reward: bool = field(default=True, metadata={"help": "Also reward with each task's own answer scorer."})


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
    from quill.cli import run_guarded

    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
