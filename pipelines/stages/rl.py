"""Online RL (the RLHF branch) with TRL's GRPOTrainer, starting from the SFT model.

    quill rl --config recipes/tiny/rl.yaml [reward_model_path=OUT/reward] [key=value ...]

Rewards (quill.rewards): the tasks' own verifiable scorers (reasoning-gym's `score_answer`), plus the reward model
trained by the `reward` stage only when it agrees with them. Before training, the stage samples the start policy on
held-out prompts and measures that agreement (within-group AUC of the reward model on right vs wrong samples); below
`reward_model_min_agreement` it says so and trains on the verifiable reward alone. The same samples give sampled
pass@1 at the rollout temperature, pass@k and the headroom pass@k - greedy, with a warning when it is too small
for RL to show. GRPO samples `num_generations` completions per prompt and pushes the policy toward the
better-than-average ones; no value model is needed. A group whose answers are all right or all wrong has no
task-reward signal: with `learnable_prompt_samples: k` the stage first keeps only the training prompts the start
policy answers right sometimes in k samples (quill.rewards.learnable_prompts).
"""

import math
from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer

from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.errors import QuillError, run_guarded
from quill.heldout import SAMPLES, EvalArguments, compare_to_start, describe, headroom_warning
from quill.loading import CLASSIFIER, check_model_path, load_for_inference, load_tokenizer
from quill.options import parse_stage_args
from quill.rewards import ScaledRewardModel, TaskReward, learnable_prompts, reward_model_agreement, use_reward_model
from quill.stages.common import load_stage_data, load_task_eval, log, run_stage, start_stage


@dataclass
class RLConfig(GRPOConfig):
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward-model folder or Hub id (the reward stage's output)."}
    )
    verifiable_reward: bool = field(default=True, metadata={"help": "Reward with each task's own answer scorer."})
    reward_model_min_agreement: float | None = field(
        default=0.65,
        metadata={
            "help": "Use the reward model only if its within-group AUC (right vs wrong samples of the start policy on "
            "held-out prompts) reaches this; otherwise train on the verifiable reward alone. null: use it without "
            "this check (RLHF on prompts no task scorer can grade; the agreement is still measured and reported)."
        },
    )
    reward_model_weight: float = field(
        default=0.2,
        metadata={
            "help": "The reward model's term is weight * tanh(standardised score), so its spread within a group stays "
            "below the 1.0 between a right and a wrong answer; must be < 0.5."
        },
    )

    learnable_prompt_samples: int = field(
        default=0,
        metadata={
            "help": "Before training, sample this many answers per training prompt from the start policy and train "
            "only on the prompts it answers right sometimes but not always (the only GRPO groups with a task-reward "
            "signal). 0 trains on every prompt."
        },
    )

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
        if self.reward_model_path and self.scale_rewards in (True, "group"):
            raise QuillError(
                "scale_rewards 'group' divides each group's rewards by their own spread, which turns reward-model "
                "noise in groups whose task reward is constant into full-size advantages",
                "set scale_rewards: batch (or none) when reward_model_path is set",
            )
        if not self.reward_model_path and not self.verifiable_reward:
            raise QuillError("rl: no reward given", fix="set reward_model_path and/or verifiable_reward: true")


ARG_TYPES = (DataArguments, ModelArguments, RLConfig, OutputArguments, EvalArguments)


def reward_functions(args: RLConfig, model_args, start: dict, task_rows: list[dict]) -> tuple[list, dict]:
    """The reward functions GRPO gets, and the metrics that record the choice (agreement, used or not, why)."""
    funcs, info = [], {}
    if args.verifiable_reward:
        funcs.append(TaskReward(args.num_generations))
    if args.reward_model_path:
        check_model_path(args.reward_model_path)
        tokenizer = load_tokenizer(args.reward_model_path, model_args.trust_remote_code)
        # On the training device: it scores every GRPO batch, and TRL prepares only reward models it loads itself.
        reward_model = load_for_inference(args.reward_model_path, model_args, "reward", tokenizer, task=CLASSIFIER)
        rows = task_rows[: len(start[SAMPLES])]
        agreement = reward_model_agreement(reward_model, tokenizer, rows, start[SAMPLES], start["_sample_correct"])
        used, why = use_reward_model(agreement, args.reward_model_min_agreement)
        if not args.verifiable_reward and not used:
            raise QuillError(f"rl: {why}, and verifiable_reward is false", "set verifiable_reward: true")
        log(f"rl: {why}")
        info = {**agreement.as_metrics(), "rm_min_agreement": args.reward_model_min_agreement, "rm_used": used}
        info["_rm_decision"] = why
        if used:
            funcs.append(
                ScaledRewardModel(reward_model, tokenizer, agreement.mean, agreement.std, args.reward_model_weight)
            )
    return funcs, info


def learnable_train_set(stage, args: RLConfig, train_set) -> tuple:
    """(the training prompts GRPO gets, metrics): with learnable_prompt_samples, only the prompts the start policy
    answers right sometimes but not always (checked before the held-out eval, so a recipe that leaves none fails
    at once)."""
    if not args.learnable_prompt_samples:
        return train_set, {}
    k = args.learnable_prompt_samples
    keep, share = learnable_prompts(
        stage.model, stage.tokenizer, list(train_set), k, args.temperature, args.max_completion_length, args.seed
    )
    if not keep:
        raise QuillError(
            f"rl: the start model answers each of the {len(train_set)} training prompts always or never right in {k} "
            "samples, so no prompt is left to learn from",
            "set learnable_prompt_samples: 0, or give prompts of a difficulty the model can sometimes solve",
        )
    log(f"rl: {len(keep)} of {len(train_set)} training prompts ({share:.0%}) are answered right sometimes")
    return train_set.select(keep), {"learnable_prompt_share": share}


def train(
    data_args: DataArguments,
    model_args: ModelArguments,
    args: RLConfig,
    output: OutputArguments,
    eval_args: EvalArguments,
) -> dict:
    stage = start_stage("rl", data_args, model_args, args, output)
    if stage.skipped:
        return stage.metrics
    # GRPOTrainer counts prompt and completion tokens itself; the Trainer's own count looks for input_ids, which a
    # GRPO batch does not have, and would warn on every step.
    args.include_num_input_tokens_seen = "no"
    splits = load_stage_data(data_args, "rl")
    task_rows = load_task_eval(data_args) or list(splits["eval"])
    train_set, learnable = learnable_train_set(stage, args, splits["train"])
    if not eval_args.eval_samples:
        eval_args.eval_samples = args.num_generations  # headroom and agreement need samples
    # The start policy on held-out prompts, sampled at the rollout temperature; taken before the trainer exists
    # because it decides the rewards. start_stage has already placed the policy on the training device
    # (quill.loading.place), so this sampling runs where GRPO will.
    start = eval_args.evaluate(stage.model, stage.tokenizer, task_rows, temperature=args.temperature, seed=args.seed)
    warning = headroom_warning(start)
    if warning:
        log(f"rl: warning: {warning}")
    funcs, reward_info = reward_functions(args, model_args, start, task_rows)
    trainer = GRPOTrainer(
        model=stage.model,
        args=args,
        reward_funcs=funcs,
        train_dataset=train_set,
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=stage.callbacks,
    )
    prompts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    prompts_per_step //= args.num_generations

    def evaluate() -> dict:
        if trainer.state.global_step == 0:  # the start model, already measured above
            return {k: v for k, v in start.items() if k not in (SAMPLES, "_sample_correct")}
        metrics = eval_args.evaluate(trainer.model, trainer.processing_class, task_rows, args.temperature, args.seed)
        metrics = {k: v for k, v in metrics.items() if k not in (SAMPLES, "_sample_correct")}
        metrics.update({k: v for k, v in reward_info.items() if not k.startswith("_")}, **learnable)
        metrics["rl_prompts_per_step"] = prompts_per_step
        task_reward = next((f for f in funcs if isinstance(f, TaskReward)), None)
        if task_reward is not None and task_reward.groups:
            metrics["groups_with_task_reward_variance"] = task_reward.share_with_variance
        if warning:
            metrics["headroom_warning"] = warning
        if "_rm_decision" in reward_info:
            metrics["rm_decision"] = reward_info["_rm_decision"]
        return metrics

    metrics = run_stage(stage, trainer, evaluate, datasets=data_args.names(), compare=compare_to_start(task_rows))
    if describe(metrics):
        log(f"rl: {describe(metrics)}")
    return metrics


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
