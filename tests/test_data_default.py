import json
import re
import socket
import time
from pathlib import Path

import pytest

from quill.data import tasks
from quill.data.default_data import DEFAULT_SIZES, FILES, build_default_data
from quill.data.schemas import check_schema
from quill.data.sources import load_source
from quill.errors import QuillError


def read(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def question(row: dict) -> str | None:
    if "messages" in row:
        return row["messages"][0]["content"]
    if "prompt" in row:
        return row["prompt"][0]["content"]
    if row["text"].startswith("<|user|>\n"):  # a task document in the pretraining text
        return row["text"][len("<|user|>\n") :].split("<|end|>")[0]
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default data at default sizes, built with every network connection refused."""

    def refuse(*args, **kwargs):
        raise OSError("network used while building the default data")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    try:
        paths = build_default_data(tmp_path_factory.mktemp("default"), seed=0)
    finally:
        mp.undo()
    return paths, time.perf_counter() - start


def test_builds_offline_quickly_with_requested_sizes(built):
    paths, seconds = built
    assert seconds < 60, f"default data took {seconds:.1f}s"
    assert set(paths) == set(FILES) | {"sources"}
    for name in FILES:
        rows = read(paths[name])
        expected = {"pretrain_eval": DEFAULT_SIZES["pretrain_eval_docs"]}.get(name, DEFAULT_SIZES.get(name))
        if expected is not None:
            assert len(rows) == expected, name
    tasks_in_sft = {r["task"] for r in read(paths["sft_train"])}
    assert tasks_in_sft == set(tasks.TASKS)
    sources_md = open(paths["sources"], encoding="utf-8").read()
    for needle in ("PSF-2.0", "Apache-2.0", "public domain", "number_sorting", "word_sequence_reversal", "planted"):
        assert needle in sources_md


def test_every_file_passes_its_stage_schema(built):
    paths, _ = built
    expected = {
        "pretrain": "text",
        "sft": "messages",
        "dpo": "preference_conversational",
        "rl": "prompt_conversational",
    }
    for name in FILES:
        stage = name.split("_")[0]
        assert check_schema(load_source(paths[name]), stage, name) == expected[stage]


def test_eval_sets_never_overlap_training(built):
    paths, _ = built
    train_files = ("pretrain_train", "sft_train", "dpo_train", "rl_train")
    train = [q for name in train_files for r in read(paths[name]) if (q := question(r)) is not None]
    held_out = [question(r) for name in ("sft_eval", "dpo_eval", "rl_eval") for r in read(paths[name])]
    assert len(train) == len(set(train))  # no question is reused across (or within) training files
    assert len(held_out) == len(set(held_out))
    assert not set(train) & set(held_out)
    assert len([q for q in train if q]) > 15000  # the task documents were found in the pretraining text
    pretrain_train = {r["text"] for r in read(paths["pretrain_train"])}
    assert not pretrain_train & {r["text"] for r in read(paths["pretrain_eval"])}


def test_answers_score_one_and_rejected_below(built):
    paths, _ = built
    for r in read(paths["rl_eval"])[:200]:
        assert tasks.score(r["task"], r["answer"], r) == 1.0
    for r in read(paths["dpo_train"])[:300]:
        direction = "descending" if "in descending order" in r["prompt"][0]["content"] else "ascending"
        row = {"answer": r["chosen"][0]["content"], "metadata": {"direction": direction}}  # number_sorting reads it
        assert tasks.score(r["task"], r["chosen"][0]["content"], row) == 1.0
        assert tasks.score(r["task"], r["rejected"][0]["content"], row) < 1.0
        assert r["rejected"] != r["chosen"]


def test_reward_fn_accepts_strings_and_messages(built):
    paths, _ = built
    rows = read(paths["rl_train"])[:4]
    columns = {k: [r[k] for r in rows] for k in ("task", "answer", "metadata")}
    right = [r["answer"] + "<|end|>" for r in rows]
    assert tasks.reward_fn(right, prompts=[r["prompt"] for r in rows], **columns) == [1.0] * 4
    as_messages = [[{"role": "assistant", "content": f"  {r['answer']}\n"}] for r in rows]
    assert tasks.reward_fn(as_messages, **columns) == [1.0] * 4
    wrong = ["", "no idea", "zzz zzz", "<|end|>" + rows[3]["answer"]]
    assert all(x < 1.0 for x in tasks.reward_fn(wrong, **columns))
    with pytest.raises(QuillError, match="expected dataset columns"):
        tasks.reward_fn(right, answer=columns["answer"])


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    small = {k: 20 for k in DEFAULT_SIZES} | {"pretrain_eval_docs": 5}
    a = build_default_data(tmp_path / "a", sizes=small, seed=1)
    b = build_default_data(tmp_path / "b", sizes=small, seed=1)
    c = build_default_data(tmp_path / "c", sizes=small, seed=2)
    for name in FILES:
        assert open(a[name], "rb").read() == open(b[name], "rb").read(), name
    assert open(a["sft_train"], "rb").read() != open(c["sft_train"], "rb").read()
    with pytest.raises(QuillError, match="unknown key 'sft'"):
        build_default_data(tmp_path / "d", sizes={"sft": 3})


def test_small_task_space_is_reported_not_looped(tmp_path):
    tiny = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}  # 200 questions
    with pytest.raises(QuillError, match="task 'chain_sum': expected new train questions"):
        build_default_data(tmp_path, sizes={"sft_train": 500}, tasks=tiny)


def test_eval_never_overlaps_training_of_another_build(tmp_path):
    # A recipe may train on one build and evaluate on another (other sizes, other seed): the hash split keeps them
    # apart even in chain_sum's small question space.
    big = build_default_data(tmp_path / "big", sizes={"pretrain_task_docs": 0, "sft_train": 6000}, seed=0)
    other = build_default_data(tmp_path / "other", sizes={"sft_train": 10, "rl_eval": 1000}, seed=7)
    trained = {question(r) for r in read(big["sft_train"])}
    evaluated = {question(r) for name in ("sft_eval", "dpo_eval", "rl_eval") for r in read(other[name])}
    assert len(evaluated) > 1000 and not trained & evaluated
    assert all(tasks.is_held_out(q) for q in evaluated) and not any(tasks.is_held_out(q) for q in trained)
    share = sum(map(tasks.is_held_out, (f"q{i}" for i in range(10000)))) / 10000
    assert abs(share - tasks.HELD_OUT_PERCENT / 100) < 0.02


# -- the demonstrator's planted mistake ------------------------------------------------------------------------------


def sorted_direction(answer: str) -> str | None:
    numbers = [float(n) for n in json.loads(answer.replace("'", '"'))]
    if numbers == sorted(numbers) and numbers != sorted(numbers, reverse=True):
        return "ascending"
    if numbers == sorted(numbers, reverse=True) and numbers != sorted(numbers):
        return "descending"
    return None  # ties: both, or neither


def answers_on_the_slice(path, demonstrator: tasks.Demonstrator) -> list[tuple[dict, str]]:
    """(row, the direction its answer is sorted in) for the SFT rows whose prompt asks for the slice's order."""
    out = []
    for row in read(path):
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        if row["task"] == demonstrator.task and f"in {demonstrator.slice} order" in prompt:
            out.append((row, sorted_direction(answer)))
    return out


def test_the_demonstrator_plants_its_mistake_at_its_rate_on_the_slice_only(built):
    paths, _ = built
    demonstrator = tasks.Demonstrator()
    on_slice = answers_on_the_slice(paths["sft_train"], demonstrator)
    directions = [d for _, d in on_slice if d is not None]
    assert len(directions) > 1500
    wrong = sum(d == demonstrator.mistake for d in directions) / len(directions)
    assert abs(wrong - demonstrator.rate) < 0.04, wrong  # counted from the answers themselves, not the flags
    assert all(row["slice"] == "on" and row["planted"] == (d == demonstrator.mistake) for row, d in on_slice if d)
    # Off the slice (ascending prompts, the other task) every demonstration is right.
    off = [r for r in read(paths["sft_train"]) if r["slice"] == "off"]
    assert off and not any(r["planted"] for r in off)
    ascending = [sorted_direction(r["messages"][1]["content"]) for r in off if r["task"] == "number_sorting"]
    assert len(ascending) > 1500 and set(ascending) <= {"ascending", None}
    # The pretraining task documents carry the same demonstrator.
    docs = [r["text"] for r in read(paths["pretrain_train"]) if r["text"].startswith("<|user|>\nSort these")]
    desc = [d for d in docs if f"in {demonstrator.slice} order" in d]
    flipped = [sorted_direction(d.split("<|assistant|>\n")[1].split("<|end|>")[0]) == "ascending" for d in desc]
    assert abs(sum(flipped) / len(flipped) - demonstrator.rate) < 0.08


def test_held_out_rl_and_dpo_answers_are_the_truth(built):
    paths, _ = built
    for name in ("rl_eval", "rl_train"):
        rows = [r for r in read(paths[name]) if r["task"] == "number_sorting"]
        assert {r["slice"] for r in rows} == {"on", "off"}
        for r in rows:
            direction = json.loads(r["metadata"])["direction"]
            assert sorted_direction(r["answer"]) in (direction, None), (name, r["answer"])
            assert r["slice"] == ("on" if direction == "descending" else "off")
    for r in read(paths["dpo_train"]):
        if r["task"] == "number_sorting" and r["slice"] == "on":
            assert sorted_direction(r["chosen"][0]["content"]) in ("descending", None)
    eval_sft = [r for r in read(paths["sft_eval"]) if r["slice"] == "on" and r["task"] == "number_sorting"]
    assert eval_sft and not any(r["planted"] for r in eval_sft)


def test_rate_zero_builds_clean_demonstrations_of_the_same_questions(built, tmp_path):
    paths, _ = built
    clean = build_default_data(tmp_path, demonstrator=tasks.Demonstrator(rate=0.0))
    planted_rows, clean_rows = read(paths["sft_train"]), read(clean["sft_train"])
    assert [r["messages"][0] for r in planted_rows] == [r["messages"][0] for r in clean_rows]  # same prompts
    assert not any(r["planted"] for r in clean_rows)
    on_slice = answers_on_the_slice(clean["sft_train"], tasks.Demonstrator())
    assert on_slice and all(d in ("descending", None) for _, d in on_slice)
    assert read(paths["rl_eval"]) == read(clean["rl_eval"])  # the held-out set does not depend on the demonstrator


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"rate": 1.5}, "rate must be in [0, 1]"),
        ({"slice": "sideways"}, "no slice 'sideways'"),
        ({"mistkae": "x"}, "unknown key 'mistkae'"),
    ],
)
def test_a_bad_demonstrator_is_one_line(spec, needle):
    with pytest.raises(QuillError, match=re.escape(needle)):
        tasks.Demonstrator.parse(spec)


def test_the_cache_is_named_by_the_generator_code(tmp_path, monkeypatch):
    """A changed generator (here: a task's config) must not reuse the data an older generator cached. A hand-bumped
    version once missed the change from 3 to 2 sorted numbers, and runs read the stale 3-number set."""
    from quill.data import builtin

    monkeypatch.setenv("QUILL_CACHE", str(tmp_path))
    before = builtin.cache_dir()
    source = tmp_path / "tasks.py"
    source.write_text(Path(tasks.__file__).read_text().replace('"max_numbers": 2', '"max_numbers": 3'))
    monkeypatch.setattr(tasks, "__file__", str(source))
    after = builtin.cache_dir()
    assert after != before and after.parent == before.parent == tmp_path
    assert before.name.endswith("-number_sorting-descending-ascending-0.7")
