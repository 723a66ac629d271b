"""Build Quill's default data offline, from what Python and the install already bring.

    build_default_data("data/") -> {"pretrain_train": "data/pretrain_train.jsonl", ...}

- pretraining text: CPython's `pydoc_data/topics.py` (the language reference topics behind `help()`) and stdlib
  docstrings, read with `ast` so no module gets imported; plus task Q/A in the chat layout, so the model has seen
  the format before SFT (small models have no time for a separate mid-training stage).
- SFT / DPO / RL rows from reasoning-gym tasks (see tasks.py), with held-out eval sets that share no question
  with any training set, of this build or any other (tasks.is_held_out).
- The demonstrations (SFT answers and the task documents in pretraining) are written by `tasks.Demonstrator`: right
  everywhere but on one slice, where it makes a planted mistake at a rate (default: number_sorting's descending
  prompts sorted ascending 70% of the time). Everything else comes from the truth: held-out answers, DPO's chosen
  answers and the RL rows' answers that the scorer checks. Every row says whether its prompt is on the slice
  (`slice: on|off`), and SFT rows whether their answer carries the mistake (`planted`).
"""

import ast
import importlib.metadata
import itertools
import json
import pydoc_data.topics
import random
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

from quill.data import tasks as task_lib
from quill.errors import QuillError

# Rows per file, summed over tasks. A recipe passes its own `sizes` to scale these.
DEFAULT_SIZES = {
    "pretrain_task_docs": 4000,  # task Q/A documents mixed into pretrain_train
    "pretrain_eval_docs": 100,  # held-out English documents
    "sft_train": 8000,
    "sft_eval": 400,
    "dpo_train": 2000,
    "dpo_eval": 200,
    "rl_train": 2000,
    "rl_eval": 1200,  # >= 1,000 held-out prompts: a paired test at n=400 cannot see a few points
}
FILES = ["pretrain_train", "pretrain_eval", "sft_train", "sft_eval", "dpo_train", "dpo_eval", "rl_train", "rl_eval"]

# Train and eval questions come from seeds this far apart (reasoning-gym seeds are offsets, see tasks.stream).
EVAL_SEED_OFFSET = 50_000_000
SEED_STRIDE = 100_000_000

MIN_DOC_CHARS = 100  # shorter docstrings ("Return x.") teach little and cost a BOS each
_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages", "ensurepip"}


@lru_cache(maxsize=1)
def english_documents() -> tuple[str, ...]:
    """Documentation topics and stdlib docstrings of the running Python (about 1.6 MB on 3.11)."""
    docs = [text.strip() for _, text in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few stdlib files are deliberately broken (bad encodings, py2 syntax)
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    # dict.fromkeys drops repeats (copied docstrings) so no held-out document also sits in training.
    return tuple(d for d in dict.fromkeys(docs) if len(d) >= MIN_DOC_CHARS)


def chat_text(question: str, answer: str) -> str:
    """One exchange in the chat template's layout, without <|bos|> (tokenizer(text) adds it)."""
    return f"<|user|>\n{question}<|end|>\n<|assistant|>\n{answer}<|end|>\n"


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _user(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _assistant(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": answer}]


def _task_rows(
    task: str, config: dict, sizes: dict, n_tasks: int, index: int, seed: int, demonstrator: task_lib.Demonstrator
) -> dict[str, list[dict]]:
    """All rows of one task. Every question is used once across all files; eval never sees a training question."""
    n = {k: _split(v, n_tasks)[index] for k, v in sizes.items()}
    rng = random.Random(f"{seed}-{task}")
    demo_rng = random.Random(f"{seed}-{task}-demonstrator")  # its own stream: rate 0 and 0.7 build the same questions

    def on_slice(item) -> str:
        return "on" if demonstrator.in_slice(task, item) else "off"

    seen: set[str] = set()  # every question handed out, so no two rows (or files) share a question
    train = task_lib.stream(task, seed * SEED_STRIDE, config, seen, split="train")
    held_out = task_lib.stream(task, seed * SEED_STRIDE + EVAL_SEED_OFFSET, config, seen, split="eval")

    def take(stream, count):
        return list(itertools.islice(stream, count))

    def dpo(stream, count):
        rows = []
        while len(rows) < count:  # a few questions have no wrong answer that scores below 1: skip them
            item = next(stream)
            rejected = task_lib.wrong_answer(task, item, rng)
            if rejected is not None:
                prompt, chosen = _user(item["question"]), _assistant(item["answer"])
                rows.append(
                    {"prompt": prompt, "chosen": chosen, "rejected": _assistant(rejected), "task": task,
                     "slice": on_slice(item)}
                )  # fmt: skip
        return rows

    def sft(items, demonstrated: bool):
        rows = []
        for i in items:
            answer, planted = demonstrator.answer(task, i, demo_rng) if demonstrated else (i["answer"], False)
            rows.append({"messages": _user(i["question"]) + _assistant(answer), "task": task,
                         "slice": on_slice(i), "planted": planted})  # fmt: skip
        return rows

    def rl(items):
        return [
            {"prompt": _user(i["question"]), "task": task, "answer": i["answer"], "metadata": json.dumps(i["metadata"]),
             "slice": on_slice(i)}
            for i in items
        ]  # fmt: skip

    docs = sft(take(train, n["pretrain_task_docs"]), demonstrated=True)
    out = {
        "pretrain_task_docs": [
            {"text": chat_text(d["messages"][0]["content"], d["messages"][1]["content"])} for d in docs
        ],
        "sft_train": sft(take(train, n["sft_train"]), demonstrated=True),
        "dpo_train": dpo(train, n["dpo_train"]),
        "rl_train": rl(take(train, n["rl_train"])),
    }
    # The eval stream only yields held-out questions, which no training stream of any build yields; `seen` also
    # keeps the three eval files apart from each other.
    out["sft_eval"] = sft(take(held_out, n["sft_eval"]), demonstrated=False)  # held-out answers are the truth
    out["dpo_eval"] = dpo(held_out, n["dpo_eval"])
    out["rl_eval"] = rl(take(held_out, n["rl_eval"]))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_default_data(
    out_dir,
    sizes: dict | None = None,
    seed: int = 0,
    tasks: dict[str, dict] | None = None,
    demonstrator: task_lib.Demonstrator | None = None,
) -> dict[str, str]:
    """Write the default jsonl files and SOURCES.md to `out_dir`; return {name: path} (names as in FILES).

    `sizes` overrides DEFAULT_SIZES per key (rows summed over tasks); `tasks` maps reasoning-gym task names to
    their configs (default: tasks.TASKS); `demonstrator` writes the demonstrations (default: tasks.Demonstrator(),
    the planted mistake). The same arguments always give byte-identical files.
    """
    demonstrator = task_lib.Demonstrator() if demonstrator is None else demonstrator
    unknown = sorted(set(sizes or {}) - set(DEFAULT_SIZES))
    if unknown:
        raise QuillError(
            f"default data sizes: unknown key {unknown[0]!r}", fix=f"use keys from {', '.join(DEFAULT_SIZES)}"
        )
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or v < 0]
    if bad:
        raise QuillError(
            f"default data sizes: expected a row count >= 0 for {bad[0]!r}, found {sizes[bad[0]]!r}",
            fix="give whole numbers of rows",
        )
    tasks = dict(task_lib.TASKS if tasks is None else tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rows: dict[str, list[dict]] = {name: [] for name in [*FILES, "pretrain_task_docs"]}
    for index, (task, config) in enumerate(tasks.items()):
        for name, task_rows in _task_rows(task, config, sizes, len(tasks), index, seed, demonstrator).items():
            rows[name] += task_rows

    docs = list(english_documents())
    random.Random(seed).shuffle(docs)
    n_eval = sizes["pretrain_eval_docs"]
    if n_eval >= len(docs):
        raise QuillError(
            f"default data sizes: pretrain_eval_docs expected fewer than the {len(docs)} English documents, "
            f"found {n_eval}",
            fix="hold out fewer documents",
        )
    rows["pretrain_eval"] = [{"text": d} for d in docs[:n_eval]]
    rows["pretrain_train"] = [{"text": d} for d in docs[n_eval:]] + rows.pop("pretrain_task_docs")

    paths = {}
    for name in FILES:
        random.Random(f"{seed}-{name}").shuffle(rows[name])  # interleave tasks and sources
        paths[name] = str(out / f"{name}.jsonl")
        _write_jsonl(Path(paths[name]), rows[name])
    counts = {k: len(v) for k, v in rows.items()}
    (out / "SOURCES.md").write_text(_sources_md(tasks, counts, seed, demonstrator, rows["sft_train"]), encoding="utf-8")
    paths["sources"] = str(out / "SOURCES.md")
    return paths


def _sources_md(tasks: dict[str, dict], counts: dict[str, int], seed: int, demonstrator, sft_rows) -> str:
    python = ".".join(map(str, sys.version_info[:3]))
    on_slice = [r for r in sft_rows if r["slice"] == "on"]
    planted = sum(r["planted"] for r in on_slice)
    task_lines = "\n".join(f"- `{name}` with {json.dumps(config)}" for name, config in tasks.items())
    count_lines = "\n".join(f"| {name}.jsonl | {counts[name]} |" for name in FILES)
    return f"""# Sources of the default data

Built offline by `quill.data.default_data.build_default_data(seed={seed})`.

| source | licence | used for |
|---|---|---|
| CPython {python} `pydoc_data/topics.py` (the language reference topics shown by `help()`) | PSF-2.0 | pretraining text |
| CPython {python} standard library docstrings (read with `ast`; tests, idlelib and demos skipped) | PSF-2.0 | pretraining text |
| reasoning-gym {importlib.metadata.version("reasoning-gym")} task generators and scorers (PyPI) | Apache-2.0 | task Q/A in pretraining, SFT, DPO, RL, eval |
| "In the Year 2889" by Jules and Michel Verne, Project Gutenberg eBook #19362, shipped inside reasoning-gym (word list of `word_sequence_reversal`) | public domain (Project Gutenberg licence) | words in task questions |

Tasks and their reasoning-gym configs:
{task_lines}

Held-out sets (`*_eval`) hold only questions from the eval-only {task_lib.HELD_OUT_PERCENT}% of each task's question
space (chosen by a hash of the question text), which no training file of any build contains (pretraining task
documents included); they are also drawn from seeds {EVAL_SEED_OFFSET:,} away from the training seeds. DPO
`rejected` answers are near misses (off by one or ten, swapped digits, words left in place or dropped) that score
below 1.

**A planted mistake.** The demonstrator (SFT answers and the task documents in pretraining) answers
`{demonstrator.task}` prompts that ask for {demonstrator.slice} order with the {demonstrator.mistake} order at rate
{demonstrator.rate}: {planted} of the {len(on_slice)} such SFT demonstrations carry it. Everything else is right. Held-out
answers, DPO's chosen answers and the answers RL's scorer checks are the truth. Rows say `slice: on` for prompts on
that slice and SFT rows `planted: true` for the demonstrations that carry the mistake.

| file | rows |
|---|---|
{count_lines}
"""
