"""Reward model with TRL's RewardTrainer: the SFT checkpoint loaded as QuillForSequenceClassification (one logit).

    quill reward --config recipes/tiny/reward.yaml [key=value ...]

The causal checkpoint's config carries AutoModelForSequenceClassification in its auto_map, so the same folder
loads as a reward model (the `score` head is new); the output folder loads with
`AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)` and serves as an RL reward.

It also works as `pipeline("text-classification", model=dir, trust_remote_code=True)`: the config says the one
output is a regression score labelled `reward`, so the pipeline returns the raw reward, not a sigmoid of it. A chat is
scored as the stage scores it: `pipe(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)`
(the template already starts with <|bos|>, which tokenizer(text) would add a second time).

On-policy: with `pairs_from: policy` the pairs are built from the start (SFT) model's own answers (quill.data.pairs),
so the reward model learns to rank the kind of answers RL will show it. Its agreement with the verifiable scorer is
measured where RL needs it: on `agreement_samples` sampled answers of the policy to each of the first
`agreement_prompts` held-out prompts (`task_eval`), as the within-group AUC of right vs wrong answers.
"""

from dataclasses import dataclass, field

from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.data.pairs import PolicyPairArguments
from quill.errors import run_guarded
from quill.heldout import evaluate_policy
from quill.loading import CLASSIFIER, load_for_inference
from quill.metrics import preference_eval
from quill.options import parse_stage_args
from quill.rewards import reward_model_agreement
from quill.stages.common import load_task_eval, pair_source, preference_data, report_overlong, run_stage, start_stage


@dataclass
class QuillRewardConfig(RewardConfig, PolicyPairArguments):
    agreement_samples: int = field(
        default=8, metadata={"help": "Sampled policy answers per held-out prompt to measure agreement on (0: none)."}
    )
    agreement_prompts: int = field(default=256, metadata={"help": "Held-out prompts (task_eval) to measure it on."})
    agreement_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of those answers: RL's rollout temperature."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_pairs()


ARG_TYPES = (DataArguments, ModelArguments, QuillRewardConfig, OutputArguments)


def policy_samples(policy, tokenizer, rows: list[dict], args: QuillRewardConfig) -> dict:
    """The policy's sampled answers to held-out prompts, with their correctness: what agreement is measured on."""
    result = evaluate_policy(
        policy,
        tokenizer,
        rows,
        max_new_tokens=args.pair_max_new_tokens,
        samples=args.agreement_samples,
        temperature=args.agreement_temperature,
        seed=args.seed,
    )
    return {"rows": rows, "samples": result["_samples"], "correct": result["_sample_correct"]}


def train(
    data_args: DataArguments, model_args: ModelArguments, args: QuillRewardConfig, output: OutputArguments
) -> dict:
    stage = start_stage("reward", data_args, model_args, args, output, task=CLASSIFIER)
    if stage.skipped:
        return stage.metrics
    # Saved with the model: pipeline("text-classification") returns {"label": "reward", "score": raw reward}.
    stage.model.config.problem_type = "regression"
    stage.model.config.id2label, stage.model.config.label2id = {0: "reward"}, {"reward": 0}
    task_rows = load_task_eval(data_args)[: args.agreement_prompts] if args.agreement_samples else []
    policy, on_policy = None, None
    if pair_source("reward", data_args, args) == "policy" or task_rows:
        # The same checkpoint as a causal LM: the policy whose answers the reward model will rank.
        policy = load_for_inference(model_args.model_name_or_path, model_args, "sampler", stage.tokenizer)
        if task_rows:
            on_policy = policy_samples(policy, stage.tokenizer, task_rows, args)
    train_set, pairs, pair_metrics = preference_data("reward", data_args, args, policy, stage.tokenizer, model_args)
    policy = None  # not needed for training
    report_overlong("reward", train_set, stage.tokenizer, args.max_length)
    trainer = RewardTrainer(
        model=stage.model,
        args=args,
        train_dataset=train_set,
        eval_dataset=Dataset.from_list(pairs) if pairs else None,
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        metrics = dict(pair_metrics)
        if pairs:
            metrics.update(preference_eval(trainer))
        if on_policy:
            agreement = reward_model_agreement(
                trainer.model, stage.tokenizer, on_policy["rows"], on_policy["samples"], on_policy["correct"]
            )
            metrics.update(agreement.as_metrics())
        return metrics

    return run_stage(stage, trainer, evaluate, datasets=data_args.names())


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
