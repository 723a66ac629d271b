"""Pretraining rows packed from a stream of documents, with a position that a checkpoint keeps.

A large source (fineweb-edu's sample-10BT is tens of GB) is read as a `datasets` stream: `max_samples` caps it
before anything is downloaded, and documents are read, tokenized and packed a chunk at a time as training consumes
them. `PackedStream` is a torch IterableDataset: under several processes accelerate's dispatcher has the main
process read it and send each rank its rows, so the data is read and tokenized once, not once per rank.

Resume keeps the data position without reading the stream again from the start. Before each chunk the stream notes
the source's own position (`datasets`' `state_dict()`: shard and row) and the index of the chunk's first packed
row. At a checkpoint `StreamPosition` records where the rows the optimizer has consumed end: the chunk holding the
next row, as (source position, rows of that chunk to skip). That record is written into the checkpoint's
trainer_state.json, the file the Trainer writes last, so a checkpoint is complete only with its position. On resume
the source is reopened at that position, the one chunk re-packed, and its consumed rows skipped.

The stream is endless: at the end of the source it starts another pass (`max_steps` ends training).
"""

import collections
import itertools
from collections.abc import Callable

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from quill.data.packing import pack_documents
from quill.errors import QuillError


class PackedStream(torch.utils.data.IterableDataset):
    """Rows of `seq_len` tokens (input_ids, position_ids, labels) packed from `open_documents()` (a `datasets`
    IterableDataset of {"text"} rows, opened lazily: only a process that iterates reads anything).

    `encode(texts)` gives each text's token ids (BOS first, EOS last). Documents are packed `chunk_documents` at
    a time (best fit within the chunk, as pack_dataset does within a map batch)."""

    def __init__(
        self,
        open_documents: Callable,
        encode: Callable[[list[str]], list[list[int]]],
        seq_len: int,
        pad_id: int,
        chunk_documents: int = 1000,
    ):
        super().__init__()
        self.open_documents, self.encode = open_documents, encode
        self.seq_len, self.pad_id, self.chunk_documents = seq_len, pad_id, chunk_documents
        self.start = {"pass": 0, "source": None, "chunk_row": 0, "skip": 0}
        self._chunks: collections.deque = collections.deque()  # (first row index, pass, source state before it)

    def resume_at(self, position: dict) -> None:
        """Continue from a position `position_at` returned (call before iterating)."""
        self.start = dict(position)
        self._chunks.clear()

    def position_at(self, rows_consumed: int) -> dict | None:
        """Where the stream must restart so that its next row is row number `rows_consumed` (counted from the start
        of training); None if this process has not read that far."""
        while len(self._chunks) > 1 and self._chunks[1][0] <= rows_consumed:
            self._chunks.popleft()  # consumption only grows: older chunks are never needed again
        if not self._chunks or self._chunks[0][0] > rows_consumed:
            return None
        first_row, pass_, source = self._chunks[0]
        return {"pass": pass_, "source": source, "chunk_row": first_row, "skip": rows_consumed - first_row}

    def __iter__(self):
        pass_, source, row, skip = (self.start[k] for k in ("pass", "source", "chunk_row", "skip"))
        self._chunks.clear()
        while True:
            documents = self.open_documents()
            if source is not None:
                documents.load_state_dict(source)
            iterator, before, yielded = iter(documents), source, False
            while True:
                texts = [doc["text"] for doc in itertools.islice(iterator, self.chunk_documents)]
                if not texts:
                    break
                rows = pack_documents(self.encode(texts), self.seq_len, self.pad_id)
                self._chunks.append((row, pass_, before))
                for packed in rows[skip:]:
                    yielded = True
                    yield packed
                row, skip = row + len(rows), 0
                before = documents.state_dict()  # exact at the document boundary: the next chunk starts here
            if not yielded and source is None:
                raise QuillError(
                    "pretraining stream: expected documents, found none", "check the data source and its max_samples"
                )
            pass_, source = pass_ + 1, None


class StreamPosition(TrainerCallback, ExportableState):
    """Saves the stream's position in every checkpoint (trainer_state.json) and restores it on resume.

    Rows consumed after N optimizer steps = N x per-device batch x gradient accumulation x processes (the main
    process reads every rank's rows). The stage sets `ignore_data_skip` so the Trainer does not also skip
    batches by reading them again."""

    def __init__(self, stream: PackedStream, rows_per_step: int):
        self.stream, self.rows_per_step, self.global_step = stream, rows_per_step, 0

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        position = saved.get("attributes", {}).get("position") if isinstance(saved, dict) else None
        if state.global_step and position is None:
            raise QuillError(
                f"the checkpoint at step {state.global_step} holds no stream position",
                "it was written by a run without streaming: set streaming to what that run used, or overwrite=true",
            )
        if position is not None and state.global_step:
            self.stream.resume_at(position)
        self.global_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.global_step = state.global_step

    def state(self) -> dict:
        position = self.stream.position_at(self.global_step * self.rows_per_step)
        return {"args": {}, "attributes": {"position": position}}
