"""Sequence-to-sequence training (translation-style tasks) with transformers' Seq2SeqTrainer: an encoder-decoder
learns target = f(source) by teacher forcing, and is evaluated by generating.

    quill seq2seq --config recipes/tiny-seq2seq/seq2seq.yaml [key=value ...]

Data: `source`/`target` columns (other names: `source_column`/`target_column`, or a source's `columns:` renames);
Hub translation sets (wmt14, opus_books) with a `translation: {de: ..., en: ...}` column and the pair chosen by
`source_lang`/`target_lang`; or chat rows (`messages`: the user turn is the source, the assistant's reply the
target). The model is a fresh `QuillForConditionalGeneration` (`model_config`) or any seq2seq checkpoint
(`AutoModelForSeq2SeqLM`: T5, BART, Marian, ...). DataCollatorForSeq2Seq pads sources and targets and builds the
decoder inputs; `train_sampling_strategy: group_by_length` batches similar lengths together.

Evaluation generates (greedy unless `generation_num_beams`): corpus BLEU, chrF and exact match through the shipped
`evaluate` module `quill/metric_modules/bleu_chrf.py` (sacrebleu's numbers, offline), plus the teacher-forced loss,
on the `eval_size` split and on `task_eval` rows ({prompt, answer}: the default data's held-out sets), before and
after training. Under several processes the loss is transformers' own `evaluate()` average. `paired_with` names a
decoder-only chat model (e.g. the same pairs trained by SFT): it answers the same task_eval prompts, is scored the
same way, and the exact match is paired row by row (95% interval, exact McNemar p; quill.stats).
"""

from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

import quill.metric_modules
from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.errors import QuillError, run_guarded
from quill.loading import CAUSAL_LM, SEQ2SEQ_LM, load_for_inference, load_tokenizer
from quill.metrics import correctness, generate_completions
from quill.options import parse_stage_args
from quill.stages.common import finished_folder, load_stage_data, load_task_eval, log, run_stage, start_stage, versus

METRIC_MODULE = str(Path(quill.metric_modules.__file__).with_name("bleu_chrf.py"))
METRICS = ("bleu", "chrf", "exact_match")
PREDICTIONS = "_heldout_predictions"  # this model's held-out answers, kept for the paired comparison (never saved)


@dataclass
class Seq2SeqConfig(Seq2SeqTrainingArguments):
    source_column: str = field(default="source", metadata={"help": "Column holding the input text."})
    target_column: str = field(default="target", metadata={"help": "Column holding the text to produce."})
    source_lang: str | None = field(
        default=None,
        metadata={"help": "With target_lang: rows hold `translation: {lang: text}` (wmt14, opus_books); the source."},
    )
    target_lang: str | None = field(default=None, metadata={"help": "The target language key of `translation`."})
    max_source_length: int = field(default=128, metadata={"help": "Source tokens kept (longer ones are truncated)."})
    max_target_length: int = field(default=128, metadata={"help": "Target tokens kept, EOS included."})
    predict_with_generate: bool = field(
        default=True, metadata={"help": "Evaluate by generating (BLEU, chrF, exact match), not only by the loss."}
    )
    generation_max_length: int | None = field(
        default=None, metadata={"help": "Tokens generated in evaluation; default: max_target_length."}
    )
    paired_with: str | None = field(
        default=None,
        metadata={
            "help": "A finished decoder-only chat model (a stage name of this run, or a folder) that answers the same "
            "task_eval prompts as chat: both are scored with BLEU, chrF and exact match, the exact match paired."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if (self.source_lang is None) != (self.target_lang is None):
            raise ValueError("source_lang and target_lang go together: set both (a translation pair) or neither")
        if self.generation_max_length is None:
            self.generation_max_length = self.max_target_length


ARG_TYPES = (DataArguments, ModelArguments, Seq2SeqConfig, OutputArguments)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from (seed, epoch) instead of the global RNG: the Trainer calls
    set_epoch before each epoch, so a resumed run replays the interrupted epoch's batches exactly (with the stock
    sampler the order after a kill differed, and so did the weights)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class QuillSeq2SeqTrainer(Seq2SeqTrainer):
    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler


def pair_of(row: dict, args: Seq2SeqConfig) -> tuple[object, object, str]:
    """(source, target, where the target comes from) of one row, in the shapes this stage reads."""
    if args.source_lang is not None:
        pair = row.get("translation") or {}
        return pair.get(args.source_lang), pair.get(args.target_lang), f"translation.{args.target_lang}"
    if "messages" in row and args.source_column not in row:  # a chat pair: the user turn -> the assistant's reply
        user = [m["content"] for m in row["messages"] if m.get("role") == "user"]
        reply = [m["content"] for m in row["messages"] if m.get("role") == "assistant"]
        return (user[-1] if user else None), (reply[-1] if reply else None), "the assistant turn"
    if "prompt" in row and "answer" in row and args.source_column not in row:  # held-out task rows
        prompt = row["prompt"]
        if isinstance(prompt, list):  # a conversational prompt: its last user turn
            prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), None)
        return prompt, row["answer"], "answer"
    return row.get(args.source_column), row.get(args.target_column), args.target_column


def check_columns(dataset, args: Seq2SeqConfig, where: str) -> None:
    have = set(dataset.column_names)
    if args.source_lang is not None:
        if "translation" not in have:
            raise QuillError(
                f"{where}: source_lang/target_lang need a `translation` column, found columns {sorted(have)}",
                "drop source_lang/target_lang for source/target columns, or rename the pair column to translation",
            )
        return
    if {args.source_column, args.target_column} <= have or "messages" in have or {"prompt", "answer"} <= have:
        return
    missing = [c for c in (args.source_column, args.target_column) if c not in have]
    raise QuillError(
        f"{where}: expected columns {args.source_column!r} and {args.target_column!r} (missing {missing[0]!r}), "
        f"found {sorted(have)}",
        "rename columns with a source's `columns: {old: source}`, set source_column/target_column, or give a "
        "translation set with source_lang/target_lang",
    )


def tokenize_pairs(dataset, tokenizer, args: Seq2SeqConfig, where: str):
    """input_ids/attention_mask from the source, labels from the target + EOS; a bad row stops with one line."""
    check_columns(dataset, args, where)
    sources, targets = [], []
    for i, row in enumerate(dataset):
        source, target, name = pair_of(row, args)
        for text, what in ((source, "source"), (target, name)):
            if not isinstance(text, str) or not text.strip():
                raise QuillError(
                    f"{where} row {i}: expected a non-empty {what} string, found {text!r}",
                    "drop rows with empty sources or targets, or fill them in",
                )
        sources.append(source)
        targets.append(target)
    features = tokenizer(sources, truncation=True, max_length=args.max_source_length)
    # The target ends in EOS, so generation learns to stop; no BOS (the decoder starts from decoder_start_token_id).
    target_ids = tokenizer(targets, add_special_tokens=False, truncation=True, max_length=args.max_target_length - 1)
    labels = [ids + [tokenizer.eos_token_id] for ids in target_ids["input_ids"]]
    return datasets.Dataset.from_dict({**features, "labels": labels})


def bleu_chrf(tokenizer):
    """compute_metrics for Seq2SeqTrainer: the generated ids decoded, scored against the decoded references."""
    import evaluate

    metric = evaluate.load(METRIC_MODULE)

    def compute(eval_preds) -> dict:
        preds, labels = eval_preds
        predictions, references = decode(tokenizer, preds), decode(tokenizer, labels)
        scores = metric.compute(predictions=predictions, references=references)
        return {name: scores[name] for name in METRICS}

    return compute


def train(data_args: DataArguments, model_args: ModelArguments, args: Seq2SeqConfig, output: OutputArguments) -> dict:
    stage = start_stage("seq2seq", data_args, model_args, args, output, task=SEQ2SEQ_LM)
    if stage.skipped:
        return stage.metrics
    if not getattr(stage.model.config, "is_encoder_decoder", False):
        raise QuillError(
            f"model '{model_args.model_name_or_path}' is not an encoder-decoder (is_encoder_decoder is false)",
            "start from a seq2seq checkpoint (T5, BART, a Quill seq2seq stage), or from model_config",
        )
    with args.main_process_first(desc="seq2seq data"):
        splits = load_stage_data(data_args, None)  # any columns: this stage checks its own shapes below
        train_rows = tokenize_pairs(splits["train"], stage.tokenizer, args, "seq2seq training data")
        eval_rows = heldout = None
        if len(splits["eval"]):
            eval_rows = tokenize_pairs(splits["eval"], stage.tokenizer, args, "seq2seq eval split")
        task_rows = load_task_eval(data_args)  # held-out {prompt, answer} rows, e.g. quill:default/rl_eval
        if task_rows:
            heldout = tokenize_pairs(datasets.Dataset.from_list(task_rows), stage.tokenizer, args, "task_eval")
    log(f"seq2seq: {len(train_rows)} training pairs, {len(eval_rows or [])} eval, {len(heldout or [])} held-out")
    trainer = QuillSeq2SeqTrainer(
        model=stage.model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=DataCollatorForSeq2Seq(stage.tokenizer, model=stage.model),
        processing_class=stage.tokenizer,
        compute_metrics=bleu_chrf(stage.tokenizer) if args.predict_with_generate else None,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        metrics = {}
        if eval_rows is not None:
            metrics |= picked(trainer.evaluate(eval_dataset=eval_rows, metric_key_prefix="eval"), "eval")
        if heldout is not None:
            out = trainer.predict(heldout, metric_key_prefix="heldout")
            metrics |= picked(out.metrics, "heldout")
            if args.predict_with_generate:
                metrics[PREDICTIONS] = decode(stage.tokenizer, out.predictions)
                if all("task" in row for row in task_rows):  # the task's own scorer, as the chat stages report
                    metrics["heldout_task_accuracy"] = mean(correctness(task_rows, metrics[PREDICTIONS]))
        return metrics

    def compare(before: dict, after: dict) -> dict:
        if not args.paired_with or PREDICTIONS not in after:
            return {}
        return paired_comparison(args, task_rows, after[PREDICTIONS], stage, model_args)

    return run_stage(stage, trainer, evaluate, datasets=data_args.names(), compare=compare)


def picked(scores: dict, prefix: str) -> dict:
    return {f"{prefix}_{m}": scores[f"{prefix}_{m}"] for m in ("loss", *METRICS) if f"{prefix}_{m}" in scores}


def decode(tokenizer, ids) -> list[str]:
    ids = np.where(ids < 0, tokenizer.pad_token_id, ids)  # -100: padding added when batches are gathered
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def mean(values) -> float:
    values = list(values)
    return sum(map(bool, values)) / len(values) if values else float("nan")


def paired_comparison(args: Seq2SeqConfig, rows: list[dict], ours: list[str], stage, model_args) -> dict:
    """The `paired_with` chat model answers the same held-out prompts (greedy, as chat); both sets of answers are
    scored against the same references, and exact match is compared row by row (this model minus the other)."""
    import evaluate

    folder = finished_folder(args.paired_with, stage.output_dir)
    tokenizer = load_tokenizer(str(folder))
    other = load_for_inference(str(folder), model_args, "eval", tokenizer, task=CAUSAL_LM)
    prompts = [row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
               for row in rows]  # fmt: skip
    theirs = [t.strip() for t in generate_completions(other, tokenizer, prompts, args.generation_max_length,
                                                      args.per_device_eval_batch_size)]  # fmt: skip
    references = [row["answer"].strip() for row in rows]
    name = Path(args.paired_with).name
    scores = evaluate.load(METRIC_MODULE).compute(predictions=theirs, references=references)
    metrics = {f"{name}_heldout_{m}": scores[m] for m in METRICS}
    if all("task" in row for row in rows):
        metrics[f"{name}_heldout_task_accuracy"] = mean(correctness(rows, theirs))
    log(f"seq2seq: BLEU {name} {scores['bleu']:.1f}, chrF {name} {scores['chrf']:.1f}")
    right = [[a == r for a, r in zip(answers, references, strict=True)] for answers in (theirs, ours)]
    return metrics | versus("seq2seq", "exact_match", name, *right)


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
