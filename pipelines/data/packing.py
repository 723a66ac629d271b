"""Pack tokenized pretraining documents into fixed-length rows without crossing documents.

Every document starts with BOS. Best-fit decreasing puts each document (or seq_len-sized piece of a longer one:
nothing is dropped) into the row with the least room that still fits it, so rows rarely need padding and no
document is cut at a row boundary unless it is longer than a row. Rows carry `position_ids` that restart at 0 at
every document start; the model's packed attention reads those restarts as document boundaries, so there is no
attention_mask. The strategy matches `trl.pack_dataset(strategy="bfd_split")`, and TRL's rows are as safe on Quill:
through TRL's padding-free collator each document's logits equal the document's alone (max difference 3.6e-7,
measured; tests/test_model.py checks the collator), first tokens unlabelled, iterable datasets too. What TRL lacks is a
fixed row length: its rows are ragged and padding-free flattens a batch into one row of varying length, while these
rows are always seq_len long, so every step has the same shape (torch.compile compiles once; the memory peak is
known from the first step), hence this file.

`labels` are the inputs with -100 on padding and on the first token of every document: with the usual shift, that
token would be predicted from the end of the previous document, a target no context can justify.
"""

import bisect

import torch

from quill.errors import QuillError

IGNORE_INDEX = -100


def _pieces(docs: list[list[int]], seq_len: int) -> list[list[int]]:
    return [doc[i : i + seq_len] for doc in docs for i in range(0, len(doc), seq_len)]


def _row(pieces: list[list[int]], seq_len: int, pad_id: int) -> dict[str, list[int]]:
    input_ids, position_ids, labels = [], [], []
    for piece in pieces:
        input_ids += piece
        position_ids += range(len(piece))
        labels += [IGNORE_INDEX] + piece[1:]
    pad = seq_len - len(input_ids)
    # Padding is its own segment (positions from 0), so real tokens never attend to it.
    input_ids += [pad_id] * pad
    position_ids += range(pad)
    labels += [IGNORE_INDEX] * pad
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing of token lists into rows of exactly `seq_len` tokens."""
    if seq_len < 2:
        raise QuillError(f"packing: expected seq_len >= 2, found {seq_len}", fix="use a sequence length like 512")
    pieces = sorted(_pieces(docs, seq_len), key=len, reverse=True)  # stable: same input, same rows
    rows: list[list[list[int]]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the tightest fit
    for piece in pieces:
        i = bisect.bisect_left(free, (len(piece), -1))
        if i < len(free):
            room, row = free.pop(i)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(piece)
        if room > len(piece):
            bisect.insort(free, (room - len(piece), row))
    return [_row(row, seq_len, pad_id) for row in rows]


def pack_batch(batch: dict[str, list], seq_len: int, pad_id: int) -> dict[str, list]:
    """`Dataset.map(pack_batch, batched=True, fn_kwargs=..., remove_columns=...)` over an `input_ids` column.

    Packs within each map batch; a larger `batch_size` packs tighter.
    """
    rows = pack_documents(batch["input_ids"], seq_len, pad_id)
    return {key: [row[key] for row in rows] for key in ("input_ids", "position_ids", "labels")}


def tokenize_batch(batch: dict[str, list], tokenizer, text_column: str = "text") -> dict[str, list]:
    """Token ids per document with BOS first, for `Dataset.map(batched=True)`."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise QuillError(
            f"tokenizer {tokenizer.name_or_path!r}: expected a bos (or eos) token to start documents, found none",
            fix="use a tokenizer with a BOS token, e.g. one trained by `quill tokenizer`",
        )
    ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
    return {"input_ids": [[bos] + x for x in ids]}


def pack_dataset(ds, seq_len: int, pad_id: int | None, batch_size: int = 1000, num_proc: int | None = None):
    """Pack a tokenized dataset (an `input_ids` column, one document per row) into `seq_len` rows."""
    if pad_id is None:
        raise QuillError(
            "packing: expected a pad token id for the rare padded row, found None",
            fix="give the tokenizer a pad token (Quill's tokenizer has <|pad|>)",
        )
    if "input_ids" not in ds.column_names:
        raise QuillError(
            f"packing: expected an 'input_ids' column, found columns {ds.column_names}",
            fix="tokenize first, e.g. ds.map(tokenize_batch, batched=True, fn_kwargs={'tokenizer': tok})",
        )
    return ds.map(
        pack_batch,
        batched=True,
        batch_size=batch_size,
        fn_kwargs={"seq_len": seq_len, "pad_id": pad_id},
        remove_columns=ds.column_names,
        num_proc=num_proc,
        desc="Packing",
    )


def collate_packed(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack packed rows into LongTensors (input_ids, position_ids, labels); no attention_mask on purpose."""
    keys = ("input_ids", "position_ids", "labels")
    return {key: torch.tensor([row[key] for row in rows], dtype=torch.long) for key in keys}
