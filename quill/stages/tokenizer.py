"""Tokenizer: train a byte-level BPE on the pretraining text, or adopt an existing tokenizer, and save it Hub-format.

    quill tokenizer --config recipes/tiny/tokenizer.yaml [vocab_size=8192]

The saved folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) is what every later stage loads, so a
model and its tokenizer always agree. metrics.json records compression (UTF-8 bytes per token) on held-out text.
"""

import json
from dataclasses import dataclass, field

from quill.checkpoint import prepare_output_dir
from quill.markers import is_stage_done, mark_stage_done
from quill.config import DataArguments, RunArguments, parse_stage_args
from quill.data.tokenizer import CHAT_TEMPLATE, bytes_per_token, train_tokenizer
from quill.models import load_tokenizer, read_json
from quill.stages.common import load_stage_data, log


@dataclass
class TokenizerConfig:
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size, special tokens included."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair count for a BPE merge."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Use this existing tokenizer (Hub id or folder) instead of training one."}
    )
    max_train_documents: int | None = field(default=None, metadata={"help": "Train on at most this many documents."})


ARG_TYPES = (DataArguments, TokenizerConfig, RunArguments)


def train(data_args: DataArguments, args: TokenizerConfig, run: RunArguments) -> dict:
    out = prepare_output_dir(run.output_dir or "outputs/tokenizer", overwrite=run.overwrite)
    if is_stage_done(out):
        log(f"tokenizer: already finished in {out}; skipping (set overwrite=true to redo it)")
        return read_json(out / "metrics.json")
    splits = load_stage_data(data_args, "pretrain")
    if args.tokenizer_name_or_path:
        tokenizer = load_tokenizer(args.tokenizer_name_or_path)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHAT_TEMPLATE  # later stages talk in chat; give it Quill's template
    else:
        texts = splits["train"]["text"][: args.max_train_documents]
        log(f"tokenizer: training a {args.vocab_size}-token BPE on {len(texts)} documents")
        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    metrics = {"vocab_size": len(tokenizer), "bytes_per_token": bytes_per_token(tokenizer, splits["eval"]["text"])}
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    mark_stage_done(out, {"stage": "tokenizer"})
    log(f"tokenizer: {metrics['vocab_size']} tokens, {metrics['bytes_per_token']:.2f} bytes/token -> {out}")
    return metrics


def main(argv=None):
    from quill.cli import run_guarded

    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
