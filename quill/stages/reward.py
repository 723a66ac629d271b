"""Reward model with TRL's RewardTrainer: the SFT checkpoint loaded as QuillForSequenceClassification (one logit).

    quill reward --config recipes/tiny/reward.yaml [key=value ...]

The causal checkpoint's config carries AutoModelForSequenceClassification in its auto_map, so the same folder
loads as a reward model (the `score` head is new); the output folder loads with
`AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)` and serves as an RL reward.

It also works as `pipeline("text-classification", model=dir, trust_remote_code=True)`: the config says the one
output is a regression score labelled `reward`, so the pipeline returns the raw reward, not a sigmoid of it. A chat is
scored as the stage scores it: `pipe(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)`
(the template already starts with <|bos|>, which tokenizer(text) would add a second time).
"""

from trl import RewardConfig, RewardTrainer

from quill.arguments import DataArguments, ModelArguments, RunArguments
from quill.errors import run_guarded
from quill.loading import CLASSIFIER
from quill.metrics import reward_preference_accuracy
from quill.options import parse_stage_args
from quill.stages.common import load_stage_data, report_overlong, run_stage, start_stage

ARG_TYPES = (DataArguments, ModelArguments, RewardConfig, RunArguments)


def train(data_args: DataArguments, model_args: ModelArguments, args: RewardConfig, run: RunArguments) -> dict:
    stage = start_stage("reward", data_args, model_args, args, run, task=CLASSIFIER)
    if stage.skipped:
        return stage.metrics
    # Saved with the model: pipeline("text-classification") returns {"label": "reward", "score": raw reward}.
    stage.model.config.problem_type = "regression"
    stage.model.config.id2label, stage.model.config.label2id = {0: "reward"}, {"reward": 0}
    splits = load_stage_data(data_args, "reward")
    report_overlong("reward", splits["train"], stage.tokenizer, args.max_length)
    pairs = list(splits["eval"])
    trainer = RewardTrainer(
        model=stage.model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        processing_class=stage.tokenizer,
        peft_config=stage.peft_config,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        return reward_preference_accuracy(trainer.model, stage.tokenizer, pairs)

    return run_stage(stage, trainer, evaluate, datasets=data_args.names())


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
