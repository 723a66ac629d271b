"""Labelled data for the encoder stages: its schema checks, and the offline sets `quill:encoder/<name>` names.

Schemas (a Hub dataset or local files; `columns:` renames as for any source):

| stage | columns |
|---|---|
| classify | text: non-empty string; label: a string or int, or a `ClassLabel` feature (its names are the label set) |
| qa | context, question: strings; answers: {text: [str], answer_start: [int]} (SQuAD), each a span of its context |

Bad rows are one-line QuillErrors naming the source, the row (numbered from 0, as `ds[i]`) and the fix.

The offline sets (`build_encoder_data`, cached under `$QUILL_CACHE` like `quill:default/`) come from the English
documents the default data is built from (CPython's reference topics and stdlib docstrings), split by document into
disjoint parts, so masked-LM pretraining never sees a passage the labelled sets are made of:

- `mlm_train`: {text} documents for the tokenizer and the mlm stage (which hold out some with eval_size);
- `classify`: {text, label}: a sentence as written (`natural`) or with its words shuffled (`shuffled`), half each:
  word-order acceptability, a judgement masked-LM pretraining is known to help with. Few rows on purpose (800: the
  recipe holds out 500, so 300 train): pretraining pays most when labels are scarce. Measured before choosing (seed
  0, from a masked-LM encoder at held-out loss 5.79): with 300 training rows the pretrained encoder beat the one
  from scratch by 0.15 (p=2e-8), with 1,258 by 0.035 (p=0.016); two swapped words (the first design) stayed near
  chance for both, even with 300 rows;
- `qa`: SQuAD-style rows: a passage, the question `What follows "<three words of it>"?` and its answer, the next
  two words, a span of the passage at `answer_start`.
"""

import json
import random
import re
import sys
from pathlib import Path

import datasets

from quill.data import default_data
from quill.data.builtin import build_once, cache_root, code_digest
from quill.errors import QuillError

PREFIX = "quill:encoder/"
FILES = ("mlm_train", "classify", "qa")
SIZES = {"classify_docs": 1200, "qa_docs": 1000, "classify_rows": 800, "qa_rows": 3000}
LABELS = ("natural", "shuffled")
QA_COLUMNS = ("context", "question", "answers")

_WORD = re.compile(r"[A-Za-z][a-z]+")  # plain lower-case words (a capital first letter allowed)
_SENTENCE_WORD = re.compile(r"[A-Za-z][a-z'-]*[,;:]?|[0-9]+")  # a word as sentences hold it
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# -- schema checks -------------------------------------------------------------------------------------------------


def _missing(source: str, stage: str, wanted: tuple[str, ...], have: list[str]) -> QuillError:
    missing = [c for c in wanted if c not in have]
    return QuillError(
        f"{source}: stage '{stage}' needs columns {'+'.join(wanted)}, but column {missing[0]!r} is missing "
        f"(found columns {have})",
        f"rename the column that holds it with `columns: {{<your column>: {missing[0]}}}` on the source",
    )


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def class_names(ds) -> list[str] | None:
    """The names of a `ClassLabel` label column, or None for plain labels."""
    feature = ds.features.get("label") if ds.features else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def check_classification(ds, source: str, labels: list | None = None) -> list[str]:
    """Check {text, label} rows; return the label set: `labels` if given, else the ClassLabel's names, else every
    label the rows use (sorted). A label outside a given or declared set is an error naming the row."""
    have = list(ds.column_names)
    if "text" not in have or "label" not in have:
        raise _missing(source, "classify", ("text", "label"), have)
    names = class_names(ds)
    values = list(ds["label"])
    if names is not None:  # ClassLabel ids: the label set is the feature's names
        values = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in values]
        if labels is not None and [str(x) for x in labels] != names:
            raise QuillError(
                f"{source}: labels is {list(labels)} but the dataset's ClassLabel names are {names}",
                "drop labels (the ClassLabel names are used) or list the same names in the same order",
            )
    allowed = [str(x) for x in (labels if labels is not None else names or [])]
    for i, (text, label) in enumerate(zip(list(ds["text"]), values)):
        if not isinstance(text, str) or not text.strip():
            raise QuillError(
                f"{source} row {i}, column 'text': expected a non-empty string, found {_show(text)}",
                "drop empty rows or fill them in",
            )
        if label is None or isinstance(label, (list, dict, float)):
            raise QuillError(
                f"{source} row {i}, column 'label': expected one class (a string or an int), found {_show(label)}",
                "store one class name or class id per row",
            )
        if names is not None and label == -1:  # datasets' ClassLabel id for "no label"
            raise QuillError(
                f"{source} row {i}, column 'label': -1 is a ClassLabel's 'no label' (benchmarks such as GLUE keep "
                "their test labels private)",
                "train and evaluate on a labelled split: `split: train` (the held-out rows come from eval_size)",
            )
        if allowed and str(label) not in allowed:
            raise QuillError(
                f"{source} row {i}, column 'label': {_show(label)} is not in the label set {allowed}",
                f"add {_show(str(label))} to `labels`, or fix or drop the row",
            )
    return allowed or sorted({str(v) for v in values})


def check_qa(ds, source: str) -> None:
    """Check SQuAD-style rows: every answer text must sit in its context at its answer_start."""
    have = list(ds.column_names)
    if any(c not in have for c in QA_COLUMNS):
        raise _missing(source, "qa", QA_COLUMNS, have)
    for i, row in enumerate(ds.select_columns(list(QA_COLUMNS))):
        for column in ("context", "question"):
            if not isinstance(row[column], str) or not row[column].strip():
                raise QuillError(
                    f"{source} row {i}, column '{column}': expected a non-empty string, found {_show(row[column])}",
                    "drop empty rows or fill them in",
                )
        answers, context = row["answers"], row["context"]
        if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) or not answers["text"]:
            raise QuillError(
                f"{source} row {i}, column 'answers': expected {{text: [...], answer_start: [...]}} with at least "
                f"one answer, found {_show(answers)}",
                "store answers as SQuAD does: {text: [answer], answer_start: [its character offset in context]}",
            )
        starts = answers.get("answer_start") or []
        if len(starts) != len(answers["text"]):
            raise QuillError(
                f"{source} row {i}, column 'answers': {len(answers['text'])} answer texts but {len(starts)} "
                "answer_start offsets",
                "give one answer_start per answer text",
            )
        for text, start in zip(answers["text"], starts):
            if (
                not isinstance(text, str)
                or not text
                or not isinstance(start, int)
                or context[start : start + len(text)] != text
            ):
                found = context.find(text) if isinstance(text, str) and text else -1
                fix = (
                    f"set answer_start to {found}, where the answer text starts in the context"
                    if found >= 0
                    else "extractive QA answers must be copied from the context: fix the answer or drop the row"
                )
                raise QuillError(
                    f"{source} row {i}, column 'answers': answer {_show(text)} at answer_start {start!r} is not a "
                    f"span of the context",
                    fix,
                )


# -- the offline sets ------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    # Named by the generators' code (this module and the documents' source): a changed generator builds anew.
    return cache_root() / f"encoder-data-{code_digest(sys.modules[__name__], default_data)}"


def resolve(path: str) -> str:
    """Map `quill:encoder/NAME` to its jsonl file (building the sets once); any other path is returned as is."""
    if not isinstance(path, str) or not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX) :]
    if name not in FILES:
        raise QuillError(f"dataset '{path}' does not exist", f"use {PREFIX} with one of {', '.join(FILES)}")
    target = cache_dir()
    build_once(target, build_encoder_data)
    return str(target / f"{name}.jsonl")


def _sentences(doc: str, min_words: int, max_words: int) -> list[list[str]]:
    """Sentences of plain words (punctuation and code make poor word-order examples), as word lists."""
    out = []
    for sentence in _SENTENCE_END.split(" ".join(doc.split())):
        words = sentence.rstrip(".!?").split()
        if min_words <= len(words) <= max_words and all(_SENTENCE_WORD.fullmatch(w) for w in words):
            out.append(words)
    return out


def classify_rows(docs: list[str], n: int, rng: random.Random) -> list[dict]:
    """Word-order acceptability: a sentence as written, or with its words shuffled into another order."""
    sentences = [s for d in docs for s in _sentences(d, 5, 32)]
    rng.shuffle(sentences)
    rows = []
    for words in sentences[:n]:
        label = LABELS[len(rows) % 2]
        if label == "shuffled":
            shuffled = list(words)
            while [w.lower() for w in shuffled] == [w.lower() for w in words]:
                rng.shuffle(shuffled)
            words = shuffled
        rows.append({"text": " ".join(words) + ".", "label": label})
    return rows


def qa_rows(docs: list[str], n: int, rng: random.Random, context_words: int = 60, per_passage: int = 2) -> list[dict]:
    """Extractive QA: which two words follow a three-word cue that occurs once in the passage (up to `per_passage`
    questions on different cues per passage)."""
    rows = []
    for doc in docs:
        words = " ".join(doc.split()).split(" ")
        for start in range(0, max(1, len(words) - 10), context_words):
            passage = words[start : start + context_words]
            context = " ".join(passage)
            spots = [k for k in range(len(passage) - 4) if all(_WORD.fullmatch(w) for w in passage[k : k + 5])]
            rng.shuffle(spots)
            asked = 0
            for k in spots:
                if asked == per_passage:
                    break
                cue = " ".join(passage[k : k + 3])
                if context.count(cue) != 1:
                    continue
                answer = " ".join(passage[k + 3 : k + 5])
                answer_start = context.index(cue) + len(cue) + 1
                assert context[answer_start : answer_start + len(answer)] == answer
                rows.append(
                    {
                        "id": str(len(rows)),
                        "context": context,
                        "question": f'What follows "{cue}"?',
                        "answers": {"text": [answer], "answer_start": [answer_start]},
                    }
                )
                asked += 1
    rng.shuffle(rows)
    return rows[:n]


def build_encoder_data(out_dir, seed: int = 0, sizes: dict | None = None) -> dict[str, str]:
    """Write FILES as jsonl and SOURCES.md to `out_dir`; the same arguments always give byte-identical files."""
    sizes = {**SIZES, **(sizes or {})}
    docs = list(default_data.english_documents())
    random.Random(f"{seed}-encoder").shuffle(docs)
    n_c, n_q = sizes["classify_docs"], sizes["qa_docs"]
    parts = {
        "classify": classify_rows(docs[:n_c], sizes["classify_rows"], random.Random(f"{seed}-classify")),
        "qa": qa_rows(docs[n_c : n_c + n_q], sizes["qa_rows"], random.Random(f"{seed}-qa")),
        "mlm_train": [{"text": d} for d in docs[n_c + n_q :]],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in FILES:
        paths[name] = str(out / f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in parts[name])
    counts = "\n".join(f"| {name}.jsonl | {len(parts[name])} |" for name in FILES)
    (out / "SOURCES.md").write_text(
        f"# Sources of the encoder data\n\nBuilt offline by `quill.data.labelled.build_encoder_data(seed={seed})` "
        "from CPython's reference topics and stdlib docstrings (PSF-2.0), split by document: no passage of "
        "classify or qa is in mlm_train.\n\n| file | rows |\n|---|---|\n" + counts + "\n",
        encoding="utf-8",
    )
    return paths


# -- loading for a stage ---------------------------------------------------------------------------------------------


def load_stage_rows(data_args, stage: str, labels: list | None = None):
    """(DatasetDict(train, eval), label set or None) for an encoder stage: `pretrain` text for mlm, `classify` rows
    with `label` turned into ids of the label set, or `qa` rows. Each source is checked before mixing, so an error
    names the source's own row; `quill:encoder/` and `quill:default/` paths are built offline on first use."""
    from quill.data.sources import load_mixture, load_source

    sources = data_args.sources()
    for src in sources:
        src.path = resolve(data_args.resolve(src.path))
    mix = {"seed": data_args.dataset_seed, "eval_size": data_args.eval_size}
    if stage == "pretrain":
        return load_mixture(sources, stage="pretrain", **mix), None
    found: list[str] = []
    for src in sources:
        ds = load_source(src)
        if stage == "classify":
            found += [x for x in check_classification(ds, src.path, labels) if x not in found]
        else:
            check_qa(ds, src.path)
    splits = load_mixture(sources, **mix)
    if stage != "classify":
        return splits, None
    label_set = [str(x) for x in labels] if labels is not None else found
    if labels is None and class_names(splits["train"]) is None:
        label_set = sorted(found)
    names = class_names(splits["train"])

    def to_id(batch):
        return {"label": [label_set.index(names[v] if names else str(v)) for v in batch["label"]]}

    splits = splits.map(to_id, batched=True, desc="label ids")
    return splits.cast_column("label", datasets.Value("int64")), label_set
