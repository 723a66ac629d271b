import random
from collections import Counter

import datasets
import pytest
import torch

from quill.data.packing import IGNORE_INDEX, collate_packed, pack_batch, pack_dataset, pack_documents, tokenize_batch
from quill.errors import QuillError

BOS, PAD = 0, 2


def make_docs(n: int, max_len: int, seed: int = 0) -> list[list[int]]:
    # Each document: BOS then tokens that encode (doc id, offset), so every token in the output can be traced back.
    rng = random.Random(seed)
    return [[BOS] + [1000 * (d + 1) + i for i in range(rng.randint(0, max_len))] for d in range(n)]


def segments(row: dict) -> list[list[int]]:
    """Split a packed row where position_ids restart; inside a segment they must count up by one."""
    out = []
    for tok, pos in zip(row["input_ids"], row["position_ids"]):
        if pos == 0:
            out.append([])
        assert pos == len(out[-1]), f"position_ids do not count up inside a segment: {row['position_ids']}"
        out[-1].append(tok)
    return out


def check_rows(docs: list[list[int]], rows: list[dict], seq_len: int) -> dict[int, list[list[int]]]:
    """Assert the packing invariants; return each document's pieces as found in the rows."""
    assert all(len(r[k]) == seq_len for r in rows for k in ("input_ids", "position_ids", "labels"))
    out = Counter(t for r in rows for t, lab in zip(r["input_ids"], r["labels"]) if not (t == PAD and lab == -100))
    assert out == Counter(t for d in docs for t in d)  # no token lost or duplicated
    pieces: dict[int, list[list[int]]] = {}
    for row in rows:
        for seg in segments(row):
            if set(seg) == {PAD}:
                continue
            body = seg[1:] if seg[0] == BOS else seg
            owners = {t // 1000 - 1 for t in body}
            assert len(owners) <= 1, f"segment mixes documents: {seg}"
            where = [t % 1000 + 1 for t in body]  # index of each token in its document
            assert where == list(range(where[0], where[0] + len(where))) if where else True  # contiguous
            if seg[0] == BOS:
                assert not where or where[0] == 1  # a BOS only ever starts its own document
            pieces.setdefault(owners.pop() if owners else -1, []).append(seg)
        # labels are the inputs except at segment starts and on padding
        for tok, pos, lab in zip(row["input_ids"], row["position_ids"], row["labels"]):
            assert lab == (IGNORE_INDEX if pos == 0 or tok == PAD else tok)
    return pieces


@pytest.mark.parametrize("seq_len", [8, 32, 64])
def test_every_token_accounted_and_documents_never_mixed(seq_len):
    docs = make_docs(200, max_len=3 * seq_len)
    rows = pack_documents(docs, seq_len, pad_id=PAD)
    check_rows(docs, rows, seq_len)
    # Best fit wastes little: padding only in the last few rows' leftovers.
    n_tokens = sum(len(d) for d in docs)
    assert len(rows) * seq_len - n_tokens < 0.1 * n_tokens


def test_position_ids_restart_exactly_at_document_starts():
    docs = [[BOS, 1000, 1001], [BOS, 2000], [BOS, 3000, 3001, 3002]]
    rows = pack_documents(docs, seq_len=10, pad_id=PAD)
    assert len(rows) == 1
    row = rows[0]
    # longest first, then one pad token as its own segment
    assert row["input_ids"] == [BOS, 3000, 3001, 3002, BOS, 1000, 1001, BOS, 2000, PAD]
    assert row["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0]
    # labels: inputs, minus the first token of each document (it would be predicted across a boundary) and padding
    assert row["labels"] == [-100, 3000, 3001, 3002, -100, 1000, 1001, -100, 2000, -100]
    check_rows(docs, rows, 10)


def test_long_documents_are_split_not_dropped():
    long_doc = [BOS] + [1000 + i for i in range(25)]  # document 0, 26 tokens
    docs = [long_doc, [BOS, 2000]]
    rows = pack_documents(docs, seq_len=8, pad_id=PAD)
    pieces = check_rows(docs, rows, 8)
    parts = sorted(pieces[0], key=lambda seg: -1 if seg[0] == BOS else seg[0])
    assert [t for p in parts for t in p] == long_doc  # the pieces put back together are the document
    assert sorted(len(p) for p in parts) == [2, 8, 8, 8]


def test_exact_fit_needs_no_padding():
    docs = [[BOS, 1000, 1001, 1002], [BOS, 2000, 2001], [BOS, 3000], [BOS, 4000], [BOS]]  # 4 + (3+1) + (2+2)
    rows = pack_documents(docs, seq_len=4, pad_id=PAD)
    check_rows(docs, rows, 4)
    assert len(rows) == 3 and all(PAD not in r["input_ids"] for r in rows)


def test_map_batched_and_collate():
    docs = make_docs(50, max_len=40, seed=1)
    ds = datasets.Dataset.from_dict({"input_ids": docs})
    packed = pack_dataset(ds, seq_len=32, pad_id=PAD, batch_size=20)
    assert packed.column_names == ["input_ids", "position_ids", "labels"]
    check_rows(docs, list(packed), 32)
    same = ds.map(pack_batch, batched=True, fn_kwargs={"seq_len": 32, "pad_id": PAD}, remove_columns=["input_ids"])
    check_rows(docs, list(same), 32)
    assert len(same) <= len(packed)  # one big batch packs at least as tightly as batches of 20
    batch = collate_packed([packed[0], packed[1]])
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert all(v.dtype == torch.long and v.shape == (2, 32) for v in batch.values())


def test_tokenize_batch_prepends_bos():
    class Tok:
        bos_token_id, eos_token_id, name_or_path = 7, 8, "fake"

        def __call__(self, texts, add_special_tokens):
            assert add_special_tokens is False
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    assert tokenize_batch({"text": ["ab", "c"]}, Tok()) == {"input_ids": [[7, 97, 98], [7, 99]]}


def test_bad_inputs():
    with pytest.raises(QuillError, match="pad token"):
        pack_dataset(datasets.Dataset.from_dict({"input_ids": [[1]]}), 8, pad_id=None)
    with pytest.raises(QuillError, match="'input_ids' column"):
        pack_dataset(datasets.Dataset.from_dict({"text": ["a"]}), 8, pad_id=PAD)
    with pytest.raises(QuillError, match="seq_len"):
        pack_documents([[1]], 1, pad_id=PAD)
