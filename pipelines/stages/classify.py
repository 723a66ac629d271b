"""Sequence classification fine-tuning with the Trainer: an encoder (or any checkpoint) gets a label head.

    quill classify --config recipes/tiny-encoder/classify.yaml [key=value ...]

Data: `text,label` rows (local files, labels as strings or ints) or a dataset whose `label` is a `ClassLabel`
(quill.data.labelled checks them). The label set is `labels` if given, else the ClassLabel's names, else every label
in the data, sorted; it is saved in the model's config (id2label), so `pipeline("text-classification")` answers with
label names. Held-out accuracy and macro F1 come from the `evaluate` modules shipped in quill.metric_modules.

`paired_with: <stage or folder>` scores another finished classifier on the same held-out rows and reports this
model minus that one, paired per row (`accuracy_vs_<name>_*`: exact McNemar p and a 95% interval,
quill.stats), e.g. a pretrained encoder against the same encoder fine-tuned from scratch.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from quill import metric_modules
from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.data.labelled import load_stage_rows
from quill.errors import QuillError, run_guarded
from quill.loading import CLASSIFIER, TASKS, load_for_inference
from quill.options import parse_stage_args
from quill.stages.common import finished_folder, run_stage, start_stage, versus

CORRECT = "_correct"  # per held-out row: 1 if predicted right (kept for the paired comparison, never saved)


@dataclass
class ClassifyConfig(TrainingArguments):
    max_length: int = field(default=128, metadata={"help": "Tokens per text; longer texts are truncated."})
    labels: list[str] | None = field(
        default=None, metadata={"help": "The label set, in id order; default: ClassLabel names or the data's labels."}
    )
    paired_with: str | None = field(
        default=None,
        metadata={
            "help": "A finished classifier (a stage name of this run, or a folder) to compare with on the same "
            "held-out rows, paired."
        },
    )


ARG_TYPES = (DataArguments, ModelArguments, ClassifyConfig, OutputArguments)


def tokenized(split, tokenizer, max_length: int):
    def encode(batch):
        return {**tokenizer(list(batch["text"]), truncation=True, max_length=max_length), "labels": batch["label"]}

    return split.map(encode, batched=True, remove_columns=split.column_names, desc="tokenize")


def predict(model, dataset, collate, batch_size: int) -> np.ndarray:
    """Logits of a frozen model on every row, in order, on this process (a paired model on the small held-out set)."""
    logits = []
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            batch = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
            logits.append(model(**batch).logits.float().cpu().numpy())
    return np.concatenate(logits)


def scores(logits: np.ndarray, references: list[int]) -> tuple[list[int], dict]:
    """Per-row correctness and the held-out accuracy and macro F1 (shipped evaluate modules)."""
    predictions = np.argmax(logits, axis=-1).tolist()
    metrics = metric_modules.load("accuracy").compute(predictions=predictions, references=references)
    f1 = metric_modules.load("f1").compute(predictions=predictions, references=references, average="macro")
    correct = [int(p == r) for p, r in zip(predictions, references)]
    return correct, {"eval_accuracy": metrics["accuracy"], "eval_macro_f1": f1["f1"], "eval_rows": len(correct)}


def train(data_args: DataArguments, model_args: ModelArguments, args: ClassifyConfig, output: OutputArguments) -> dict:
    # The label set sizes the head, so the data is read (and checked) before the model is built.
    splits, labels = load_stage_rows(data_args, "classify", args.labels)
    task = TASKS[CLASSIFIER].with_head(id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    stage = start_stage("classify", data_args, model_args, args, output, task=task)
    if stage.skipped:
        return stage.metrics
    stage.model.config.problem_type = "single_label_classification"
    train_rows = tokenized(splits["train"], stage.tokenizer, args.max_length)
    eval_rows = tokenized(splits["eval"], stage.tokenizer, args.max_length) if len(splits["eval"]) else None
    trainer = Trainer(
        model=stage.model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=DataCollatorWithPadding(stage.tokenizer),
        processing_class=stage.tokenizer,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        if eval_rows is None:
            return {}
        out = trainer.predict(eval_rows, metric_key_prefix="heldout")  # every row once, across processes
        correct, metrics = scores(out.predictions, out.label_ids.tolist())
        return {**metrics, CORRECT: correct}

    def compare(before: dict, after: dict) -> dict:
        if not args.paired_with or eval_rows is None:
            return {}
        folder = finished_folder(args.paired_with, stage.output_dir)
        other = load_for_inference(str(folder), model_args, "eval", stage.tokenizer, task=task.with_head())
        if other.config.id2label != stage.model.config.id2label:
            raise QuillError(
                f"paired_with: '{args.paired_with}' predicts labels {list(other.config.id2label.values())}, "
                f"this stage {labels}",
                "compare classifiers trained on the same label set",
            )
        logits = predict(other, eval_rows, trainer.data_collator, args.per_device_eval_batch_size)
        theirs, _ = scores(logits, list(eval_rows["labels"]))
        return versus("classify", "accuracy", Path(args.paired_with).name, theirs, after[CORRECT])

    return run_stage(stage, trainer, evaluate, datasets=data_args.names(), compare=compare)


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
