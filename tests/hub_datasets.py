"""Small copies of the datasets the recipes name, in their real schemas, for the loopback Hub (tests/hub_server.py).

Each is a dataset repo laid out as on the Hub: parquet files under the same paths, and a README.md whose `configs:`
front matter maps configs and splits to those files (https://huggingface.co/docs/hub/datasets-manual-configuration).
Columns, types, config names and split names are the real ones (checked against the dataset cards and viewers):

- HuggingFaceFW/fineweb-edu, configs default and sample-10BT, split train: text, id, dump, url, file_path,
  language (strings), language_score, score (float64), token_count, int_score (int64).
- HuggingFaceTB/smoltalk, config all, splits train and test: messages (list of {content, role}), source.
- HuggingFaceH4/ultrafeedback_binarized, config default, splits train_prefs, test_prefs, train_sft, test_sft,
  train_gen, test_gen: prompt (string), prompt_id, chosen / rejected / messages (whole conversations: the user
  turn, then the assistant's), score_chosen, score_rejected (float64).

The text is CPython's own documentation (pydoc_data.topics), cut into documents: real English, offline, the same
on every machine. fineweb-edu's `sample-10BT` is split into several shards of many row groups, so a test can tell a
stream that reads a few rows from a download of the whole config.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FINEWEB, SMOLTALK, ULTRAFEEDBACK = (
    "HuggingFaceFW/fineweb-edu",
    "HuggingFaceTB/smoltalk",
    "HuggingFaceH4/ultrafeedback_binarized",
)
FINEWEB_SHARDS = 3
FINEWEB_ROWS_PER_SHARD = 400
ROW_GROUP_ROWS = 25  # many row groups per shard: a reader can stop early
MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])
CONVERSATION = pa.list_(MESSAGE)


def documents() -> list[tuple[str, str]]:
    """(topic, paragraph-sized document) pairs from CPython's documentation, in a fixed order."""
    import pydoc_data.topics as topics

    docs = []
    for topic in sorted(topics.topics):
        paragraphs = [p.strip() for p in topics.topics[topic].split("\n\n") if len(p.strip()) > 80]
        docs += [(topic, p) for p in paragraphs]
    return docs


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue()


def _card(configs: list[tuple[str, list[tuple[str, str]]]], license_: str, pretty_name: str) -> bytes:
    lines = ["---", f"license: {license_}", "language:", "- en", f"pretty_name: {pretty_name}", "configs:"]
    for name, splits in configs:
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits]
    lines += ["---", "", f"# {pretty_name} (a small copy in the real schema, for Quill's tests)", ""]
    return "\n".join(lines).encode()


def fineweb_edu() -> dict[str, bytes]:
    docs = documents()
    files = {}
    for shard in range(FINEWEB_SHARDS):
        rows = [docs[(shard * FINEWEB_ROWS_PER_SHARD + i) % len(docs)] for i in range(FINEWEB_ROWS_PER_SHARD)]
        n = len(rows)
        texts = [f"{text}\n\n(part {shard}-{i})" for i, (_, text) in enumerate(rows)]
        table = pa.table(
            {
                "text": pa.array(texts, pa.string()),
                "id": pa.array([f"<urn:uuid:{hashlib.md5(t.encode()).hexdigest()}>" for t in texts], pa.string()),
                "dump": pa.array(["CC-MAIN-2024-10"] * n, pa.string()),
                "url": pa.array([f"https://docs.python.org/3/reference/{topic}.html" for topic, _ in rows]),
                "file_path": pa.array([f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/{shard:05d}.warc.gz"] * n),
                "language": pa.array(["en"] * n, pa.string()),
                "language_score": pa.array([0.9 + (i % 10) / 100 for i in range(n)], pa.float64()),
                "token_count": pa.array([len(t.split()) for t in texts], pa.int64()),
                "score": pa.array([2.5 + (i % 20) / 10 for i in range(n)], pa.float64()),
                "int_score": pa.array([round(2.5 + (i % 20) / 10) for i in range(n)], pa.int64()),
            }
        )
        files[f"sample/10BT/{shard:03d}_00000.parquet"] = _parquet(table)
    files["data/CC-MAIN-2024-10/train-00000-of-00001.parquet"] = files["sample/10BT/000_00000.parquet"]
    files["README.md"] = _card(
        [
            ("default", [("train", "data/*/*")]),
            ("sample-10BT", [("train", "sample/10BT/*")]),
            ("CC-MAIN-2024-10", [("train", "data/CC-MAIN-2024-10/*")]),
        ],
        "odc-by",
        "FineWeb-Edu",
    )
    return files


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"content": question, "role": "user"}, {"content": answer, "role": "assistant"}]


def smoltalk() -> dict[str, bytes]:
    docs = documents()
    files = {}
    for split, start, n in (("train", 0, 240), ("test", 240, 24)):
        rows = docs[start : start + n]
        table = pa.table(
            {
                "messages": pa.array(
                    [_conversation(f"What does the Python reference say about {t}?", text) for t, text in rows],
                    CONVERSATION,
                ),
                "source": pa.array(["smol-magpie-ultra" if i % 2 else "smol-rewrite" for i in range(n)]),
            }
        )
        files[f"data/all/{split}-00000-of-00001.parquet"] = _parquet(table)
    files["README.md"] = _card(
        [("all", [("train", "data/all/train-*"), ("test", "data/all/test-*")])], "apache-2.0", "SmolTalk"
    )
    return files


def ultrafeedback() -> dict[str, bytes]:
    docs = documents()
    splits = {"train_prefs": 200, "test_prefs": 20, "train_sft": 40, "test_sft": 8, "train_gen": 40, "test_gen": 8}
    files, start = {}, 0
    for split, n in splits.items():
        rows = docs[start : start + n]
        start += n
        prompts = [f"Explain the Python topic '{t}' in a few sentences." for t, _ in rows]
        chosen = [_conversation(p, text) for p, (_, text) in zip(prompts, rows)]
        rejected = [_conversation(p, f"I am not sure what {t} means.") for p, (t, _) in zip(prompts, rows)]
        table = pa.table(
            {
                "prompt": pa.array(prompts, pa.string()),
                "prompt_id": pa.array([hashlib.sha256(p.encode()).hexdigest() for p in prompts], pa.string()),
                "chosen": pa.array(chosen, CONVERSATION),
                "rejected": pa.array(rejected, CONVERSATION),
                "messages": pa.array(chosen, CONVERSATION),
                "score_chosen": pa.array([8.0 + (i % 3) for i in range(n)], pa.float64()),
                "score_rejected": pa.array([2.0 + (i % 3) for i in range(n)], pa.float64()),
            }
        )
        files[f"data/{split}-00000-of-00001.parquet"] = _parquet(table)
    files["README.md"] = _card(
        [("default", [(split, f"data/{split}-*") for split in splits])], "mit", "UltraFeedback Binarized"
    )
    return files


BUILDERS = {FINEWEB: fineweb_edu, SMOLTALK: smoltalk, ULTRAFEEDBACK: ultrafeedback}


def publish(store, repos=tuple(BUILDERS)) -> dict[str, dict[str, bytes]]:
    """Create each dataset repo in a HubStore (tests/hub_server.py) with its files in one commit."""
    published = {}
    for repo_id in repos:
        files = BUILDERS[repo_id]()
        repo = store.create("dataset", repo_id, private=False) or store.get("dataset", repo_id)
        store.commit(repo, "main", "Upload the fixture", "", files, {}, [])
        published[repo_id] = files
    return published


def write(folder: Path, repo_id: str) -> Path:
    """The same files on disk (a local dataset repo folder), for tests that need no server."""
    root = Path(folder) / repo_id
    for path, data in BUILDERS[repo_id]().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root
