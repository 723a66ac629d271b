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

For recipes/bert-base and recipes/t5-small (parquet written by `datasets`, as the Hub's own conversions are, so the
files carry their `datasets` features, and a `dataset_info:` in the card as on the Hub):

- nyu-mll/glue, config sst2 (files sst2/<split>-*.parquet), splits train, validation, test: sentence (string),
  label (ClassLabel negative/positive; -1 in test, whose labels are not public), idx (int32).
- rajpurkar/squad, config plain_text (files plain_text/<split>-*.parquet), splits train, validation: id, title,
  context, question (strings), answers ({text: list of strings, answer_start: list of int32}).
- wmt/wmt14, config de-en (files de-en/<split>-*.parquet), splits train, validation, test: translation
  (a Translation feature: {de: string, en: string}).
- HuggingFaceFW/fineweb-2, config deu_Latn (files data/deu_Latn/<split>/*.parquet), splits train, test: text, id,
  dump, url, date, file_path, language, language_script, top_langs (strings), language_score (float64),
  minhash_cluster_size (int64).

The German is the English documents put through a small word table (tests need the shape and a few German words,
not fluent German).

The text is CPython's own documentation (pydoc_data.topics), cut into documents: real English, offline, the same
on every machine. fineweb-edu's `sample-10BT` is split into several shards of many row groups, so a test can tell a
stream that reads a few rows from a download of the whole config.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

FINEWEB, SMOLTALK, ULTRAFEEDBACK = (
    "HuggingFaceFW/fineweb-edu",
    "HuggingFaceTB/smoltalk",
    "HuggingFaceH4/ultrafeedback_binarized",
)
GLUE, SQUAD, WMT14, FINEWEB2 = "nyu-mll/glue", "rajpurkar/squad", "wmt/wmt14", "HuggingFaceFW/fineweb-2"
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


def _hf_parquet(rows: dict, features: datasets.Features) -> bytes:
    """Parquet as `datasets` writes it (push_to_hub, the Hub's conversions): its features in the schema metadata."""
    table = datasets.Dataset.from_dict(rows, features=features).data.table  # its schema carries the features
    assert b"huggingface" in table.schema.metadata
    return _parquet(table)


def _info_card(
    configs: list[tuple[str, list[tuple[str, str]]]],
    features: datasets.Features,
    files: dict[str, bytes],
    license_: str,
    pretty_name: str,
) -> bytes:
    """A card with `dataset_info:` (features, splits per config) beside `configs:`, as the Hub's generated ones."""
    meta = {
        "license": license_,
        "language": ["en"],
        "pretty_name": pretty_name,
        "dataset_info": [
            {
                "config_name": name,
                "features": features._to_yaml_list(),
                "splits": [_split_info(split, path, features, files) for split, path in splits],
            }
            for name, splits in configs
        ],
        "configs": [
            {"config_name": name, "data_files": [{"split": split, "path": path} for split, path in files]}
            for name, files in configs
        ],
    }
    front = yaml.safe_dump(meta, sort_keys=False)
    return f"---\n{front}---\n\n# {pretty_name} (a small copy in the real schema, for Quill's tests)\n".encode()


def _split_info(split: str, pattern: str, features: datasets.Features, files: dict[str, bytes]) -> dict:
    """A split's entry in `dataset_info` (name, num_bytes, num_examples), read back from its parquet files."""
    tables = [pq.read_table(io.BytesIO(data)) for path, data in files.items() if fnmatch.fnmatch(path, pattern)]
    return {"name": split, "num_bytes": sum(t.nbytes for t in tables), "num_examples": sum(t.num_rows for t in tables)}


def _sentences(n: int, start: int = 0) -> list[str]:
    """n sentences (8-30 words) of the documents, from the start-th on."""
    found = []
    for _, doc in documents():
        for sentence in " ".join(doc.split()).split(". "):
            if 8 <= len(sentence.split()) <= 30 and sentence[:1].isalpha():
                found.append(sentence.rstrip(".") + ".")
    return found[start : start + n]


SST2_FEATURES = datasets.Features(
    {
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "positive"]),
        "idx": datasets.Value("int32"),
    }
)


def glue() -> dict[str, bytes]:
    """GLUE's sst2 config: lower-cased, space-tokenized sentences as SST-2 writes them; test labels are -1."""
    sizes = {"train": 160, "validation": 24, "test": 24}
    files, start = {}, 0
    for split, n in sizes.items():
        sentences = [s.lower().replace(",", " ,").replace(".", " .") + " " for s in _sentences(n, start)]
        start += n
        labels = [-1] * n if split == "test" else [i % 2 for i in range(n)]
        rows = {"sentence": sentences, "label": labels, "idx": list(range(n))}
        files[f"sst2/{split}-00000-of-00001.parquet"] = _hf_parquet(rows, SST2_FEATURES)
    files["README.md"] = _info_card(
        [("sst2", [(split, f"sst2/{split}-*") for split in sizes])], SST2_FEATURES, files, "other", "GLUE"
    ).replace(b"license: other\n", b"license: other\nlicense_name: glue\n")
    return files


SQUAD_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}),
    }
)


def squad() -> dict[str, bytes]:
    """SQuAD v1.1's plain_text config: questions whose answers are spans of the context (the two words after a
    three-word cue that occurs once in the paragraph)."""
    sizes = {"train": 120, "validation": 24}
    rows = []
    for topic, doc in documents():
        context = " ".join(doc.split())
        words = context.split(" ")
        for k in range(0, len(words) - 5, 7):
            cue, answer = " ".join(words[k : k + 3]), " ".join(words[k + 3 : k + 5])
            if context.count(cue) == 1 and answer.replace(" ", "").isalpha():
                start = context.index(cue) + len(cue) + 1
                rows.append((topic, context, f'What follows "{cue}"?', answer, start))
                break
        if len(rows) == sum(sizes.values()):
            break
    files, offset = {}, 0
    for split, n in sizes.items():
        part = rows[offset : offset + n]
        offset += n
        table = {
            "id": [hashlib.md5(f"{split}{i}".encode()).hexdigest()[:24] for i in range(n)],
            "title": [topic.replace("-", "_").title() for topic, *_ in part],
            "context": [context for _, context, *_ in part],
            "question": [question for _, _, question, *_ in part],
            "answers": [{"text": [answer], "answer_start": [start]} for *_, answer, start in part],
        }
        files[f"plain_text/{split}-00000-of-00001.parquet"] = _hf_parquet(table, SQUAD_FEATURES)
    files["README.md"] = _info_card(
        [("plain_text", [(split, f"plain_text/{split}-*") for split in sizes])],
        SQUAD_FEATURES,
        files,
        "cc-by-sa-4.0",
        "SQuAD",
    )
    return files


GERMAN = {
    "the": "die", "a": "ein", "an": "ein", "is": "ist", "are": "sind", "and": "und", "or": "oder", "of": "von",
    "to": "zu", "for": "für", "with": "mit", "not": "nicht", "this": "dies", "that": "dass", "it": "es", "if": "wenn",
    "on": "auf", "by": "durch", "be": "sein", "can": "kann", "as": "als", "which": "welche", "when": "wenn",
    "all": "alle", "function": "Funktion", "object": "Objekt", "value": "Wert", "name": "Name", "called": "aufgerufen",
}  # fmt: skip


def german(text: str) -> str:
    return " ".join(GERMAN.get(word.lower(), word) for word in text.split())


WMT14_FEATURES = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})


def wmt14() -> dict[str, bytes]:
    sizes = {"train": 160, "validation": 24, "test": 24}
    files, start = {}, 0
    for split, n in sizes.items():
        pairs = [{"de": german(s), "en": s} for s in _sentences(n, start)]
        start += n
        files[f"de-en/{split}-00000-of-00001.parquet"] = _hf_parquet({"translation": pairs}, WMT14_FEATURES)
    files["README.md"] = _info_card(
        [("de-en", [(split, f"de-en/{split}-*") for split in sizes])], WMT14_FEATURES, files, "unknown", "WMT14"
    )
    return files


def fineweb_2() -> dict[str, bytes]:
    docs = documents()
    files = {}
    for split, start, n in (("train", 0, 120), ("test", 120, 16)):
        texts = [german(text) for _, text in docs[start : start + n]]
        table = pa.table(
            {
                "text": pa.array(texts, pa.string()),
                "id": pa.array([f"<urn:uuid:{hashlib.md5(t.encode()).hexdigest()}>" for t in texts], pa.string()),
                "dump": pa.array(["CC-MAIN-2024-10"] * n, pa.string()),
                "url": pa.array([f"https://docs.python.org/de/3/reference/{i}.html" for i in range(n)], pa.string()),
                "date": pa.array(["2024-02-21T10:00:00Z"] * n, pa.string()),
                "file_path": pa.array(["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/00000.warc.gz"] * n, pa.string()),
                "language": pa.array(["deu"] * n, pa.string()),
                "language_score": pa.array([0.9 + (i % 10) / 100 for i in range(n)], pa.float64()),
                "language_script": pa.array(["Latn"] * n, pa.string()),
                "minhash_cluster_size": pa.array([1 + i % 3 for i in range(n)], pa.int64()),
                "top_langs": pa.array(['{"deu_Latn_score": 0.97}'] * n, pa.string()),
            }
        )
        files[f"data/deu_Latn/{split}/000_00000.parquet"] = _parquet(table)
    files["README.md"] = _card(
        [("deu_Latn", [("train", "data/deu_Latn/train/*"), ("test", "data/deu_Latn/test/*")])], "odc-by", "FineWeb2"
    )
    return files


BUILDERS = {
    FINEWEB: fineweb_edu,
    SMOLTALK: smoltalk,
    ULTRAFEEDBACK: ultrafeedback,
    GLUE: glue,
    SQUAD: squad,
    WMT14: wmt14,
    FINEWEB2: fineweb_2,
}


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
