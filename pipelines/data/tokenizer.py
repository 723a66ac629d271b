"""Train Quill's byte-level BPE tokenizer and wrap it for transformers/TRL.

The tokenizer is trained with the `tokenizers` library and saved as a plain `PreTrainedTokenizerFast`, so
`AutoTokenizer.from_pretrained(dir)` loads it anywhere without Quill installed. Conventions the stages rely on:

- `tokenizer(text)` prepends `<|bos|>` (a post-processor), so every pretraining document starts with BOS
  (BOS-aligned packing) and plain-text SFT sees the same framing.
- Chat turns are `<|role|>\\n{content}<|end|>\\n` after one leading `<|bos|>`. Generation should stop at `<|end|>`
  (end of an assistant turn) or `<|eos|>`; the stages set `generation_config.eos_token_id = [end_id, eos_id]`.
- The assistant's content and its `<|end|>` sit inside `{% generation %}`, so TRL's `assistant_only_loss=True`
  trains exactly those tokens, including the one that teaches the model to stop.
"""

import re
from collections.abc import Iterable, Iterator

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from quill.errors import QuillError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
MASK = "<|mask|>"  # only in tokenizers trained with mask_token (masked-LM pretraining of an encoder)
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]  # ids 0..6 in a freshly trained tokenizer
_SPECIAL_RE = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))

# GPT-4's split pattern with single digits (nanochat uses up to 2). One digit per token: numbers tokenize the same
# way everywhere, which small models need for arithmetic. A newline never joins the text after it, so the `\n`
# after `<|assistant|>` stays out of the assistant mask.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)

# `raise_exception` makes a typo'd role fail loudly instead of rendering an unknown `<|bot|>` marker as text.
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' + message['role'] + ': expected system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, mask_token: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and return it with Quill's special tokens and chat template. `mask_token`
    (e.g. MASK) adds a mask token for masked-LM pretraining, after the others (ids 0..6 do not move)."""
    special = SPECIAL_TOKENS + ([mask_token] if mask_token else [])
    smallest = 256 + len(special)  # every byte plus the special tokens
    if vocab_size <= smallest:
        raise QuillError(
            f"tokenizer vocab_size: expected more than {smallest} (256 bytes + {len(special)} special tokens), "
            f"found {vocab_size}",
            fix="use a vocab_size of a few thousand for a small model, e.g. 4096",
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable: no unknown token needed
        show_progress=False,
    )
    tok.train_from_iterator(_without_special_tokens(texts), trainer=trainer)
    if tok.get_vocab_size() <= smallest:
        raise QuillError(
            f"tokenizer training: expected text to learn merges from, found {tok.get_vocab_size() - smallest} merges",
            fix="pass non-empty training texts (and lower min_frequency for tiny corpora)",
        )
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT, END],
        chat_template=CHAT_TEMPLATE,
        **({"mask_token": mask_token} if mask_token else {}),
    )


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    # The trainer does not split special tokens out of raw text: chat-formatted documents would otherwise spend
    # vocabulary on dead merges like "|>\n" that encoding (which matches special tokens first) never produces.
    for text in texts:
        yield from (piece for piece in _SPECIAL_RE.split(text) if piece)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant's turn: `<|end|>` where the vocabulary has it, then end of text. The one owner of
    this fact: generation_config, the metrics' generation and `quill chat` all take it from here."""
    end = tokenizer.convert_tokens_to_ids(END)
    ids = [end if end != tokenizer.unk_token_id else None, tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


def bytes_per_token(tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token on `texts` (higher = better compression); measure it on held-out text."""
    texts = [t for t in texts if t]
    if not texts:
        raise QuillError("bytes_per_token: expected some non-empty texts, found none", fix="pass some held-out text")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_tokens = sum(len(x) for x in ids)
    return sum(len(t.encode("utf-8")) for t in texts) / n_tokens
