"""Pretraining: next-token prediction on packed documents, from scratch (a Quill config) or from a checkpoint.

    quill pretrain --config recipes/tiny/pretrain.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml -m quill.stages.pretrain --config ...

Documents are packed BOS-aligned into fixed-length rows with restarting position_ids; Quill's packed SDPA backend
keeps each document's attention to itself, so packing costs no quality and wastes no compute on padding.

Two ways to read the data. By default the sources are loaded, tokenized and packed up front (`datasets` caches the
result; the main process does it first and the others reuse its cache). With `streaming: true` (large Hub
datasets) they are read as a stream, tokenized and packed as training consumes rows, by the main process only, and
every checkpoint keeps the stream's position (pipelines/data/streaming.py).
"""

import math
from dataclasses import dataclass, field

import datasets
from transformers import Trainer, TrainingArguments

from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.data.packing import collate_packed, pack_dataset, pack_documents, tokenize_batch
from quill.data.streaming import PackedStream, StreamPosition
from quill.errors import QuillError, run_guarded
from quill.options import parse_stage_args
from quill.stages.common import load_stage_data, load_stage_stream, run_stage, start_stage
from quill.stages.distributed import eval_loss


@dataclass
class PretrainConfig(TrainingArguments):
    max_length: int = field(default=256, metadata={"help": "Tokens per packed row (the context length trained)."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the data as a stream (large Hub datasets): max_samples caps it before download, rows are "
            "tokenized and packed as training reads them, by the main process only, and each checkpoint keeps the "
            "stream's position. Needs max_steps, eval_size as a row count, and dataloader_num_workers: 0."
        },
    )


ARG_TYPES = (DataArguments, ModelArguments, PretrainConfig, OutputArguments)


def document_ids(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document: BOS opens it, EOS closes it so the model learns where documents end."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenize_batch({"text": texts}, tokenizer)["input_ids"]]


def tokenize_and_pack(dataset, tokenizer, max_length: int):
    def tokenize(batch):
        return {"input_ids": document_ids(batch["text"], tokenizer)}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")
    return pack_dataset(tokenized, max_length, pad_id=tokenizer.pad_token_id)


def streamed_rows(data_args: DataArguments, args: PretrainConfig, tokenizer):
    """(held-out packed rows or None, the training PackedStream, its position callback)."""
    if args.max_steps is None or args.max_steps <= 0:
        raise QuillError("streaming: a stream has no length, so num_train_epochs cannot end it", "set max_steps")
    if args.dataloader_num_workers:
        raise QuillError(
            f"streaming with dataloader_num_workers={args.dataloader_num_workers}: the stream's position lives in "
            "the process that reads it, and a checkpoint must record it",
            "set dataloader_num_workers: 0 (the main process reads, tokenizes and packs as training goes)",
        )
    held_out, open_training = load_stage_stream(data_args, "pretrain")
    encode = lambda texts: document_ids(texts, tokenizer)  # noqa: E731
    eval_rows = None
    if held_out:
        eval_rows = datasets.Dataset.from_list(
            pack_documents(encode([row["text"] for row in held_out]), args.max_length, tokenizer.pad_token_id)
        )
    stream = PackedStream(open_training, encode, args.max_length, tokenizer.pad_token_id)
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    args.ignore_data_skip = True  # the position callback resumes the stream; skipping would read it all again
    args.restore_callback_states_from_checkpoint = False  # the callback restores itself (it holds the stream)
    return eval_rows, stream, StreamPosition(stream, rows_per_step)


def train(data_args: DataArguments, model_args: ModelArguments, args: PretrainConfig, output: OutputArguments) -> dict:
    stage = start_stage("pretrain", data_args, model_args, args, output)
    if stage.skipped:
        return stage.metrics
    if args.streaming:
        eval_rows, train_rows, position = streamed_rows(data_args, args, stage.tokenizer)
        stage.callbacks.append(position)
    else:
        with args.main_process_first(desc="pretraining data"):  # the others then read the main process's cache
            splits = load_stage_data(data_args, "pretrain")
            train_rows = tokenize_and_pack(splits["train"], stage.tokenizer, args.max_length)
            # eval_size: 0 leaves an empty eval split on purpose: nothing to pack or evaluate then.
            has_eval = len(splits["eval"]) > 0
            eval_rows = tokenize_and_pack(splits["eval"], stage.tokenizer, args.max_length) if has_eval else None
    trainer = Trainer(
        model=stage.model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collate_packed,
        processing_class=stage.tokenizer,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        if eval_rows is None:
            return {}
        loss = eval_loss(trainer)  # a global token-weighted mean, equal on 1 or N processes
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}

    return run_stage(stage, trainer, evaluate, datasets=data_args.names())


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
