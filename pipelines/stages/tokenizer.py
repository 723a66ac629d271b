"""Tokenizer: train a byte-level BPE on the pretraining text, or adopt an existing tokenizer, and save it Hub-format.

    quill tokenizer --config recipes/tiny/tokenizer.yaml [vocab_size=8192]

The saved folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) is what every later stage loads, so a
model and its tokenizer always agree. metrics.json records compression (UTF-8 bytes per token) on held-out text.
"""

import itertools
from dataclasses import dataclass, field

from quill.arguments import DataArguments, OutputArguments
from quill.data.tokenizer import CHAT_TEMPLATE, bytes_per_token, train_tokenizer
from quill.errors import QuillError, run_guarded
from quill.loading import load_tokenizer
from quill.options import parse_stage_args
from quill.output import clear_for_overwrite, finish_folder, read_json, write_json
from quill.stages.common import is_main_process, load_stage_data, load_stage_stream, log, open_stage, push_stage


@dataclass
class TokenizerConfig:
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size, special tokens included."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair count for a BPE merge."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Use this existing tokenizer (Hub id or folder) instead of training one."}
    )
    max_train_documents: int | None = field(default=None, metadata={"help": "Train on at most this many documents."})
    # None by default, so the fingerprints of tokenizers built before this option existed still match.
    mask_token: str | None = field(
        default=None,
        metadata={
            "help": "Add this special token as the mask token, for masked-LM pretraining (the mlm stage), e.g. "
            "<|mask|>. An adopted tokenizer (tokenizer_name_or_path) gets it unless it has a mask token already."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the data as a stream (large Hub datasets): max_samples caps it before download, the "
            "held-out text is its first eval_size rows (a row count), training reads the rows after them."
        },
    )


ARG_TYPES = (DataArguments, TokenizerConfig, OutputArguments)


def train(data_args: DataArguments, args: TokenizerConfig, output: OutputArguments) -> dict:
    out, fingerprint, held, finished = open_stage("tokenizer", (data_args, args, output), output)
    if finished:
        return read_json(out / "metrics.json")
    with held:
        if args.streaming:
            rows, open_training = load_stage_stream(data_args, "pretrain")
            held_out, texts = [row["text"] for row in rows], (row["text"] for row in open_training())
        else:
            splits = load_stage_data(data_args, "pretrain")
            held_out, texts = splits["eval"]["text"], splits["train"]["text"]
        if args.tokenizer_name_or_path:
            tokenizer = load_tokenizer(args.tokenizer_name_or_path)
            if tokenizer.chat_template is None:
                tokenizer.chat_template = CHAT_TEMPLATE  # later stages talk in chat; give it Quill's template
            if args.mask_token and tokenizer.mask_token is None:
                tokenizer.add_special_tokens({"mask_token": args.mask_token})
            elif args.mask_token and tokenizer.mask_token != args.mask_token:
                raise QuillError(
                    f"tokenizer '{args.tokenizer_name_or_path}' already has the mask token "
                    f"{tokenizer.mask_token!r}, not {args.mask_token!r}",
                    f"set mask_token: {tokenizer.mask_token!r}, or drop mask_token",
                )
        else:
            texts = list(itertools.islice(texts, args.max_train_documents))  # a stream stops reading here
            log(f"tokenizer: training a {args.vocab_size}-token BPE on {len(texts)} documents")
            tokenizer = train_tokenizer(
                texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency, mask_token=args.mask_token
            )
        metrics = {"vocab_size": len(tokenizer), "bytes_per_token": bytes_per_token(tokenizer, held_out)}
        if output.overwrite:
            clear_for_overwrite(out)

        def write_files(folder):
            tokenizer.save_pretrained(folder)
            write_json(folder / "metrics.json", metrics)

        if is_main_process():
            finish_folder(out, write_files, {"stage": "tokenizer", "fingerprint": fingerprint}, weights=False)
    log(f"tokenizer: {metrics['vocab_size']} tokens, {metrics['bytes_per_token']:.2f} bytes/token -> {out}")
    if output.push_to_hub and is_main_process():  # one push, from the process that wrote the folder
        push_stage(out, output, "tokenizer")
    return metrics


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
