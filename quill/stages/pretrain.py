"""Pretraining: next-token prediction on packed documents, from scratch (a Quill config) or from a checkpoint.

    quill pretrain --config recipes/tiny/pretrain.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml -m quill.stages.pretrain --config ...

Documents are packed BOS-aligned into fixed-length rows with restarting position_ids; Quill's packed SDPA backend
keeps each document's attention to itself, so packing costs no quality and wastes no compute on padding.
"""

import math
from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from quill.arguments import DataArguments, ModelArguments, RunArguments
from quill.data.packing import collate_packed, pack_dataset, tokenize_batch
from quill.errors import run_guarded
from quill.options import parse_stage_args
from quill.stages.common import load_stage_data, run_stage, start_stage


@dataclass
class PretrainConfig(TrainingArguments):
    max_length: int = field(default=256, metadata={"help": "Tokens per packed row (the context length trained)."})


ARG_TYPES = (DataArguments, ModelArguments, PretrainConfig, RunArguments)


def tokenize_and_pack(dataset, tokenizer, max_length: int):
    def tokenize(batch):  # BOS opens each document; EOS closes it so the model learns where documents end
        return {"input_ids": [ids + [tokenizer.eos_token_id] for ids in tokenize_batch(batch, tokenizer)["input_ids"]]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")
    return pack_dataset(tokenized, max_length, pad_id=tokenizer.pad_token_id)


def train(data_args: DataArguments, model_args: ModelArguments, args: PretrainConfig, run: RunArguments) -> dict:
    stage = start_stage("pretrain", data_args, model_args, args, run)
    if stage.skipped:
        return stage.metrics
    splits = load_stage_data(data_args, "pretrain")
    train_rows = tokenize_and_pack(splits["train"], stage.tokenizer, args.max_length)
    # eval_size: 0 leaves an empty eval split on purpose: nothing to pack or evaluate then.
    eval_rows = tokenize_and_pack(splits["eval"], stage.tokenizer, args.max_length) if len(splits["eval"]) else None
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
        loss = trainer.evaluate()["eval_loss"]
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}

    return run_stage(stage, trainer, evaluate, datasets=data_args.names())


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
