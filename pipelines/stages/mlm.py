"""Masked-LM pretraining of an encoder (BERT's objective), from scratch (a Quill config with `is_decoder: false`)
or from a checkpoint.

    quill mlm --config recipes/tiny-encoder/mlm.yaml [key=value ...]

Masking is transformers' DataCollatorForLanguageModeling: `mlm_probability` of the tokens are picked (never a
special token), 80% of those become the mask token, 10% a random token, 10% stay; the loss is on picked tokens only.
`whole_word_mask: true` is the collator's whole-word masking (every token of a picked word is masked; no random
replacement then): it finds words from token offsets, and a byte-level BPE's offsets include the space before a
word, so the stage gives it offsets in which a token that starts with whitespace opens a new word.

With `packing: true` (default) documents are packed into rows of `max_length` with restarting position_ids, as in
pretraining: the encoder's packed attention keeps each document's (bidirectional) attention to itself. With
`packing: false` every row is one document (or one max_length piece of a longer one), padded, with an
attention_mask. The held-out rows are masked once, with a fixed seed, so the held-out masked-LM loss before and
after training is measured on the same masks.
"""

import hashlib
from dataclasses import dataclass, field

import datasets
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.data.labelled import load_stage_rows
from quill.data.packing import pack_documents
from quill.errors import QuillError, run_guarded
from quill.loading import MASKED_LM
from quill.options import parse_stage_args
from quill.stages.common import run_stage, start_stage
from quill.stages.distributed import eval_loss
from quill.stages.pretrain import document_ids


@dataclass
class MLMConfig(TrainingArguments):
    max_length: int = field(default=128, metadata={"help": "Tokens per row."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens picked for prediction."})
    whole_word_mask: bool = field(default=False, metadata={"help": "Pick whole words instead of single tokens."})
    packing: bool = field(
        default=True, metadata={"help": "Pack documents into full rows (position_ids restart per document)."}
    )


ARG_TYPES = (DataArguments, ModelArguments, MLMConfig, OutputArguments)


def rows(texts: list[str], tokenizer, args: MLMConfig) -> list[dict]:
    """Fixed-length rows of input_ids + position_ids (packed) or input_ids + attention_mask (one piece per row)."""
    docs = document_ids(texts, tokenizer)
    if args.packing:
        packed = pack_documents(docs, args.max_length, tokenizer.pad_token_id)
        return [{k: r[k] for k in ("input_ids", "position_ids")} for r in packed]
    pieces = [doc[i : i + args.max_length] for doc in docs for i in range(0, len(doc), args.max_length)]
    return [
        {
            "input_ids": p + [tokenizer.pad_token_id] * (args.max_length - len(p)),
            "attention_mask": [1] * len(p) + [0] * (args.max_length - len(p)),
        }
        for p in pieces
    ]


class MaskingCollator:
    """Stacks fixed-length rows and masks them with DataCollatorForLanguageModeling's own masking. Rows that
    already have labels (the held-out set, masked once) are only stacked.

    A batch's masks are drawn from a generator seeded with `seed` and the batch's tokens, not from the global RNG:
    a run resumed from a checkpoint then masks every batch as the uninterrupted run did. (The Trainer restores the
    global RNG at the checkpoint, but accelerate's loader collates one batch ahead, before the checkpoint is saved.)
    A row gets new masks each epoch, because the shuffled batches it lands in differ."""

    def __init__(self, tokenizer, args: MLMConfig, seed: int):
        self.masker = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=args.mlm_probability, whole_word_mask=args.whole_word_mask
        )
        self.seed = seed
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.opens_word = None
        if args.whole_word_mask:  # does token i start with whitespace (a new word)?
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            text = [tokenizer.convert_tokens_to_string([p]) if p else "" for p in pieces]
            self.opens_word = torch.tensor([t[:1].isspace() for t in text], dtype=torch.long)

    def offsets(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Token i spans [p_i, p_i + 1) with a one-character gap before it when it opens a word: the collator reads
        # a gap (start != previous end) as a word boundary.
        gap = self.opens_word[input_ids]
        start = torch.arange(input_ids.shape[1]) + gap.cumsum(dim=1)
        return torch.stack([start, start + 1], dim=-1)

    def __call__(self, batch: list[dict]) -> dict:
        out = {k: torch.tensor([row[k] for row in batch], dtype=torch.long) for k in batch[0]}
        if "labels" in out:
            return out
        special = torch.isin(out["input_ids"], self.special)
        offsets = self.offsets(out["input_ids"]) if self.opens_word is not None else None
        digest = hashlib.sha256(out["input_ids"].numpy().tobytes() + str(self.seed).encode()).digest()
        self.masker.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        out["input_ids"], out["labels"] = self.masker.torch_mask_tokens(
            out["input_ids"].clone(), special_tokens_mask=special, offset_mapping=offsets
        )
        return out


def masked_once(held_out: list[dict], tokenizer, args: MLMConfig, chunk: int = 256) -> datasets.Dataset:
    """The held-out rows masked with a fixed seed: the loss before and after training is measured on one masking."""
    collate, masked = MaskingCollator(tokenizer, args, seed=args.seed), []
    for i in range(0, len(held_out), chunk):
        batch = collate(held_out[i : i + chunk])
        masked += [{k: v[j].tolist() for k, v in batch.items()} for j in range(len(batch["input_ids"]))]
    return datasets.Dataset.from_list(masked)


def train(data_args: DataArguments, model_args: ModelArguments, args: MLMConfig, output: OutputArguments) -> dict:
    if model_args.model_config is not None and model_args.model_config.get("is_decoder", True):
        raise QuillError(
            "mlm: model_config builds a decoder (is_decoder is true by default), but masked-LM pretraining needs "
            "bidirectional attention",
            "add is_decoder: false to model_config",
        )
    stage = start_stage("mlm", data_args, model_args, args, output, task=MASKED_LM)
    if stage.skipped:
        return stage.metrics
    tokenizer = stage.tokenizer
    if tokenizer.mask_token is None:
        raise QuillError(
            f"mlm: tokenizer '{tokenizer.name_or_path}' has no mask token",
            "give the tokenizer stage `mask_token: <|mask|>`, or use a tokenizer with a mask token",
        )
    with args.main_process_first(desc="mlm data"):
        splits, _ = load_stage_rows(data_args, "pretrain")
        train_rows = datasets.Dataset.from_list(rows(list(splits["train"]["text"]), tokenizer, args))
        eval_rows = None
        if len(splits["eval"]):
            eval_rows = masked_once(rows(list(splits["eval"]["text"]), tokenizer, args), tokenizer, args)
    trainer = Trainer(
        model=stage.model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=MaskingCollator(tokenizer, args, seed=args.seed),
        processing_class=tokenizer,
        callbacks=stage.callbacks,
    )

    def evaluate() -> dict:
        return {"eval_loss": eval_loss(trainer)} if eval_rows is not None else {}

    return run_stage(stage, trainer, evaluate, datasets=data_args.names())


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
