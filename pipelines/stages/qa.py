"""Extractive question answering fine-tuning with the Trainer: start and end logits over the context's tokens.

    quill qa --config recipes/tiny-encoder/qa.yaml [key=value ...]

Data: SQuAD-style rows `context, question, answers: {text: [...], answer_start: [...]}`, every answer a span of its
context (quill.data.labelled checks them). The preprocessing is transformers' examples/pytorch/question-answering,
simplified: question and context are tokenized as a pair, a context longer than `max_length` is cut into windows
that overlap by `doc_stride` tokens, and a window that does not hold the (first) answer is taught to point at the
first token. At evaluation every window of an example proposes its best `n_best` starts and ends, and the highest
scoring valid span (inside the context, end >= start, at most `max_answer_length` tokens) is the answer. Exact match
and F1 are the SQuAD v1.1 metric shipped in quill.metric_modules (percentages, as `evaluate`'s squad reports them).

`paired_with: <stage or folder>` scores another finished QA model on the same held-out questions and reports this
model minus that one in exact match, paired per question (`exact_match_vs_<name>_*`, quill.stats).
"""

from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from quill import metric_modules
from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.data.labelled import load_stage_rows
from quill.errors import QuillError, run_guarded
from quill.loading import QUESTION_ANSWERING, TASKS, load_for_inference
from quill.metric_modules.squad import exact_match_score
from quill.options import parse_stage_args
from quill.stages.common import finished_folder, run_stage, start_stage, versus

EXACT = "_exact"  # per held-out question: 1 if the answer matches exactly (for the paired comparison; never saved)


@dataclass
class QAConfig(TrainingArguments):
    max_length: int = field(default=192, metadata={"help": "Tokens per window (question + context)."})
    doc_stride: int = field(default=64, metadata={"help": "Tokens shared by consecutive windows of a context."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer predicted, in tokens."})
    n_best: int = field(default=20, metadata={"help": "Start and end candidates per window at evaluation."})
    paired_with: str | None = field(
        default=None,
        metadata={
            "help": "A finished QA model (a stage name of this run, or a folder) to compare with on the same held-out "
            "questions, paired."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.doc_stride < self.max_length:
            raise ValueError(f"doc_stride must be in [0, max_length), found {self.doc_stride}")


ARG_TYPES = (DataArguments, ModelArguments, QAConfig, OutputArguments)


def windows(split, tokenizer, args: QAConfig) -> dict:
    """Question + context windows with their offsets; offsets outside the context are None."""
    enc = tokenizer(
        list(split["question"]),
        list(split["context"]),
        truncation="only_second",
        max_length=args.max_length,
        stride=args.doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    if not all(1 in enc.sequence_ids(i) for i in range(len(enc["input_ids"]))):
        raise QuillError(
            f"qa: max_length={args.max_length} leaves no room for the context after some question",
            "raise max_length, or shorten the questions",
        )
    enc["offset_mapping"] = [
        [o if s == 1 else None for o, s in zip(offsets, enc.sequence_ids(i))]
        for i, offsets in enumerate(enc["offset_mapping"])
    ]
    return enc


def train_features(split, tokenizer, args: QAConfig) -> datasets.Dataset:
    """Windows labelled with the answer's first and last token, or (0, 0) when the window does not hold it."""
    enc, all_answers = windows(split, tokenizer, args), list(split["answers"])
    starts, ends = [], []
    for offsets, example in zip(enc["offset_mapping"], enc["overflow_to_sample_mapping"]):
        answers = all_answers[example]
        first, last = answers["answer_start"][0], answers["answer_start"][0] + len(answers["text"][0])
        inside = [i for i, o in enumerate(offsets) if o is not None]
        if offsets[inside[0]][0] > first or offsets[inside[-1]][1] < last:
            starts.append(0)
            ends.append(0)
            continue
        starts.append(max(i for i in inside if offsets[i][0] <= first))
        ends.append(min(i for i in inside if offsets[i][1] >= last))
    columns = {k: enc[k] for k in ("input_ids", "attention_mask")}
    return datasets.Dataset.from_dict({**columns, "start_positions": starts, "end_positions": ends})


def best_answers(start_logits, end_logits, enc, contexts: list[str], args: QAConfig) -> list[str]:
    """Per example, the highest scoring valid span over all its windows (transformers' postprocessing, simplified)."""
    best: dict[int, tuple[float, str]] = {}
    for w, example in enumerate(enc["overflow_to_sample_mapping"]):
        offsets, context = enc["offset_mapping"][w], contexts[example]
        for s in np.argsort(start_logits[w])[::-1][: args.n_best]:
            for e in np.argsort(end_logits[w])[::-1][: args.n_best]:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > args.max_answer_length:
                    continue
                score = float(start_logits[w][s] + end_logits[w][e])
                if example not in best or score > best[example][0]:
                    best[example] = (score, context[offsets[s][0] : offsets[e][1]].strip())
    return [best.get(i, (0.0, ""))[1] for i in range(len(contexts))]


def squad_scores(predictions: list[str], split) -> tuple[list[int], dict]:
    """Per-question exact match (0/1) and the shipped squad module's exact_match and f1."""
    ids = [str(i) for i in range(len(predictions))]
    references = [{"id": i, "answers": a} for i, a in zip(ids, list(split["answers"]))]
    metrics = metric_modules.load("squad").compute(
        predictions=[{"id": i, "prediction_text": p} for i, p in zip(ids, predictions)], references=references
    )
    exact = [int(max(exact_match_score(p, t) for t in a["text"])) for p, a in zip(predictions, list(split["answers"]))]
    return exact, {"eval_exact_match": metrics["exact_match"], "eval_f1": metrics["f1"], "eval_questions": len(exact)}


def logits_of(model, features: datasets.Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits of a frozen model on every window, on this process (a paired model)."""
    starts, ends = [], []
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            batch = default_data_collator([features[j] for j in range(i, min(i + batch_size, len(features)))])
            out = model(**{k: v.to(model.device) for k, v in batch.items()})
            starts.append(out.start_logits.float().cpu().numpy())
            ends.append(out.end_logits.float().cpu().numpy())
    return np.concatenate(starts), np.concatenate(ends)


def train(data_args: DataArguments, model_args: ModelArguments, args: QAConfig, output: OutputArguments) -> dict:
    splits, _ = load_stage_rows(data_args, "qa")  # checked before a model is loaded: bad rows fail fast
    stage = start_stage("qa", data_args, model_args, args, output, task=QUESTION_ANSWERING)
    if stage.skipped:
        return stage.metrics
    train_rows = train_features(splits["train"], stage.tokenizer, args)
    held_out = splits["eval"] if len(splits["eval"]) else None
    if held_out is not None:
        enc = windows(held_out, stage.tokenizer, args)
        eval_rows = datasets.Dataset.from_dict({k: enc[k] for k in ("input_ids", "attention_mask")})
    trainer = Trainer(
        model=stage.model,
        args=args,
        train_dataset=train_rows,
        data_collator=default_data_collator,
        processing_class=stage.tokenizer,
        callbacks=stage.callbacks,
    )

    def answers(start_logits, end_logits) -> tuple[list[int], dict]:
        return squad_scores(best_answers(start_logits, end_logits, enc, list(held_out["context"]), args), held_out)

    def evaluate() -> dict:
        if held_out is None:
            return {}
        start_logits, end_logits = trainer.predict(eval_rows).predictions  # every window once, across processes
        exact, metrics = answers(start_logits, end_logits)
        return {**metrics, EXACT: exact}

    def compare(before: dict, after: dict) -> dict:
        if not args.paired_with or held_out is None:
            return {}
        folder = finished_folder(args.paired_with, stage.output_dir)
        task = TASKS[QUESTION_ANSWERING]
        other = load_for_inference(str(folder), model_args, "eval", stage.tokenizer, task=task)
        theirs, _ = answers(*logits_of(other, eval_rows, args.per_device_eval_batch_size))
        return versus("qa", "exact_match", Path(args.paired_with).name, theirs, after[EXACT])

    return run_stage(stage, trainer, evaluate, datasets=data_args.names(), compare=compare)


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
