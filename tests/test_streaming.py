"""Streaming: a large source is read only as far as training needs, and a killed streamed run resumes at its data
position (same final weights as an uninterrupted run) without reading the stream again from the start.

The source is the fineweb-edu copy of tests/hub_datasets.py (config sample-10BT: three parquet shards of many row
groups), served by the loopback Hub, whose request log counts the bytes it serves per file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import streamed_pretrain_argv
from test_resume import assert_same_weights, kill_after_checkpoint, run_ok
from tiny_outputs import REPO, is_done

SAMPLE = "sample/10BT/"


def fineweb_reads(hub) -> dict[str, int]:
    """Bytes the server sent per sample-10BT shard (GET bodies: whole files or ranges)."""
    reads: dict[str, int] = {}
    for r in hub.log:
        if r["method"] == "GET" and "fineweb-edu/resolve/" in r["path"] and SAMPLE in r["path"]:
            shard = r["path"].rsplit("/", 1)[-1]
            reads[shard] = reads.get(shard, 0) + r["bytes"]
    return reads


def tokenizer_cmd(out, streaming: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "quill.stages.tokenizer",
        f"output_dir={out}",
        "vocab_size=300",
        "dataset_mixture=[{path: HuggingFaceFW/fineweb-edu, name: sample-10BT, max_samples: 40}]",
        "eval_size=5",
        f"streaming={str(streaming).lower()}",
    ]


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "not_streaming"])
def test_max_samples_caps_a_hub_source_before_download(hub_with_datasets, tmp_path, streaming):
    """40 documents of a 1,200-document config of three shards: only the first shard is ever requested, the others
    never. The same cap without streaming is read the same way (quill.data.sources.load_source streams a capped
    Hub source); the test below shows that `load_dataset` alone fetches every shard first.

    Bytes are counted per shard as the server sends them; within the first shard a streamed GET is cut short by
    the client once it has its rows, which the server cannot see, so the claim is per shard: untouched ones."""
    hub = hub_with_datasets
    before = dict(fineweb_reads(hub))
    out = tmp_path / "tok"
    run_ok(tokenizer_cmd(out, streaming), hub.env(TOKENIZERS_PARALLELISM="false"), timeout=300)
    assert is_done(out)
    reads = {k: v - before.get(k, 0) for k, v in fineweb_reads(hub).items() if v > before.get(k, 0)}
    assert set(reads) == {"000_00000.parquet"}, reads  # shards 001 and 002: not one byte


def test_load_dataset_alone_would_read_every_shard(hub_with_datasets):
    """The contrast that makes the test above mean something: the plain, uncapped load reads all three shards."""
    hub = hub_with_datasets
    before = dict(fineweb_reads(hub))
    hub.run_python(
        "import datasets; datasets.load_dataset('HuggingFaceFW/fineweb-edu', 'sample-10BT', split='train')", timeout=300
    )
    reads = {k for k, v in fineweb_reads(hub).items() if v > before.get(k, 0)}
    assert reads == {"000_00000.parquet", "001_00000.parquet", "002_00000.parquet"}


# ----------------------------------------------------------------------------- the packed stream's position


def test_packed_stream_resumes_where_a_position_says(fineweb_local):
    """PackedStream alone: the rows after a position taken mid-stream (mid-chunk, second chunk) are the rows an
    uninterrupted iteration yields there, and no chunk before the position's is read again."""
    from quill.data.sources import load_stream
    from quill.data.streaming import PackedStream

    source = {"path": str(fineweb_local), "name": "sample-10BT", "max_samples": 60}
    opened = []

    def open_documents():
        opened.append(1)
        return load_stream([source], seed=0)

    def encode(texts):
        return [[1] + [len(w) % 50 + 2 for w in t.split()] + [0] for t in texts]

    def stream():
        return PackedStream(open_documents, encode, seq_len=32, pad_id=0, chunk_documents=8)

    full = stream()
    rows = [r["input_ids"] for r in _take(full, 200)]
    consumed = 137
    position = full.position_at(consumed)
    assert position["chunk_row"] > 0 and position["skip"] > 0 and position["source"] is not None, position

    resumed = stream()
    resumed.resume_at(json.loads(json.dumps(position)))  # as stored in trainer_state.json
    again = [r["input_ids"] for r in _take(resumed, 40)]
    assert again == rows[consumed : consumed + 40]


def _take(stream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- kill and resume a streamed stage


@pytest.mark.slow
def test_killed_streamed_pretrain_resumes_at_its_stream_position(tiny, fineweb_local, streamed_reference, tmp_path):
    out = tmp_path / "pretrain"
    cmd = [sys.executable, "-m", "quill.stages.pretrain", *streamed_pretrain_argv(out, tiny["tok"], fineweb_local)]
    kill_after_checkpoint(cmd, tiny["env"], out, step=4)
    ckpt = out / "checkpoints" / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    position = state["stateful_callbacks"]["StreamPosition"]["attributes"]["position"]
    # 4 steps x 4 rows = 16 rows consumed; the position names the chunk that holds row 16 and the rows to skip in it.
    assert position["chunk_row"] + position["skip"] == 16, position

    proc = run_ok(cmd, tiny["env"])
    assert "resuming from" in proc.stderr
    assert_same_weights(streamed_reference, out)
    assert not (out / "checkpoints").exists()


def test_streaming_refuses_workers_and_a_fraction_eval_split(tiny, fineweb_local, tmp_path):
    """Each with one line, before anything is written."""
    for extra, words in (("dataloader_num_workers=2", "dataloader_num_workers"), ("eval_size=0.1", "eval_size")):
        out = tmp_path / extra.split("=")[0]
        argv = streamed_pretrain_argv(out, tiny["tok"], fineweb_local, extra)
        proc = subprocess.run(
            [sys.executable, "-m", "quill.stages.pretrain", *argv],
            cwd=REPO,
            env=tiny["env"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and words in last and "fix:" in last, last
        assert not is_done(out) and not (out / "checkpoints").exists()
        shutil.rmtree(out, ignore_errors=True)
