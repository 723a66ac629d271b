import json

import datasets
import huggingface_hub.constants
import pytest

from quill.data import sources
from quill.data.sources import DataSource, load_mixture, load_source
from quill.errors import QuillError

ROWS = [{"text": f"document number {i}", "n": i} for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line_error(match, fn, *args, **kwargs) -> str:
    with pytest.raises(QuillError, match=match) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and "; fix: " in message
    return message


@pytest.fixture
def offline(monkeypatch):
    # No machine here reaches the Hub; offline mode makes a Hub miss fail at once instead of after retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet", ".txt"])
def test_each_local_format(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    ds = datasets.Dataset.from_list(ROWS)
    if suffix == ".json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")  # one JSON array, not lines
    elif suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".csv":
        ds.to_csv(path, index=False)
    elif suffix == ".parquet":
        ds.to_parquet(path)
    else:
        path.write_text("".join(r["text"] + "\n" for r in ROWS), encoding="utf-8")
    loaded = load_source(str(path))
    assert isinstance(loaded, datasets.Dataset)
    assert loaded["text"] == [r["text"] for r in ROWS]
    streamed = load_source(str(path), streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [r["text"] for r in streamed] == [r["text"] for r in ROWS]


def test_folder_of_files_and_save_to_disk(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:10])
    write_jsonl(folder / "b.jsonl", ROWS[10:])
    assert sorted(load_source(str(folder))["n"]) == list(range(40))

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(tmp_path / "saved")
    assert load_source(str(tmp_path / "saved"))["n"] == list(range(40))
    datasets.DatasetDict(train=ds, test=ds.select(range(3))).save_to_disk(tmp_path / "saved_dict")
    assert len(load_source({"path": str(tmp_path / "saved_dict"), "split": "test"})) == 3
    one_line_error("split 'valid' not found", load_source, {"path": str(tmp_path / "saved_dict"), "split": "valid"})


def dataset_repo(root):
    """A folder laid out like a Hub dataset repo: README with configs, data files under data/."""
    (root / "data").mkdir(parents=True)
    write_jsonl(root / "data" / "train.jsonl", ROWS[:30])
    write_jsonl(root / "data" / "test.jsonl", ROWS[30:])
    write_jsonl(root / "data" / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  default: true\n  data_files:\n"
        "  - split: train\n    path: data/train.jsonl\n  - split: test\n    path: data/test.jsonl\n"
        "- config_name: chat\n  data_files:\n  - split: train\n    path: data/chat.jsonl\n---\n# tiny\n",
        encoding="utf-8",
    )
    return root


def test_hub_id_goes_through_the_same_load_dataset_call(tmp_path, monkeypatch):
    repo = dataset_repo(tmp_path / "repo")
    calls = []
    real = datasets.load_dataset

    def fake_hub(path, name=None, **kwargs):  # what the Hub would serve for this id is the local repo folder
        calls.append((path, name, kwargs))
        return real(str(repo) if path == "quill-test/tiny" else path, name, **kwargs)

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_hub)
    hub = load_source({"path": "quill-test/tiny", "split": "test", "revision": "main"})
    local = load_source({"path": str(repo), "split": "test", "revision": "main"})
    assert hub["n"] == local["n"] == list(range(30, 40))
    assert calls[0] == ("quill-test/tiny", None, {"split": "test", "revision": "main", "streaming": False})
    assert calls[1] == (str(repo), None, {"split": "test", "revision": "main", "streaming": False})
    chat = load_source({"path": "quill-test/tiny", "name": "chat"})
    assert chat.column_names == ["messages"] and calls[-1][1] == "chat"


def test_local_repo_errors(tmp_path):
    repo = dataset_repo(tmp_path / "repo")
    one_line_error("split 'valid' not found", load_source, {"path": str(repo), "split": "valid"})
    one_line_error("config 'nope' not found", load_source, {"path": str(repo), "name": "nope"})


def test_renames_and_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = load_source({"path": str(path), "columns": {"text": "content"}, "max_samples": 5})
    assert ds.column_names == ["content", "n"] and ds["n"] == [0, 1, 2, 3, 4]
    bad_rename = {"path": str(path), "columns": {"txt": "text"}}
    message = one_line_error("expected a column 'txt' to rename", load_source, bad_rename)
    assert "found columns ['text', 'n']" in message


def test_not_found(tmp_path, offline, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no such file" in one_line_error("data/missing.jsonl", load_source, "data/missing.jsonl")
    message = one_line_error("quill-test/does-not-exist", load_source, "quill-test/does-not-exist")
    assert "not found locally or on the Hub" in message and "check the spelling" in message


def test_non_utf8_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    message = one_line_error("latin1.jsonl", load_source, str(path))
    assert "expected UTF-8 text, found byte 0xe9 at line 2" in message
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "good.jsonl", ROWS)
    (folder / "bad.csv").write_bytes(b"text\ncaf\xe9\n")
    one_line_error("bad.csv: expected UTF-8", load_source, str(folder))


def test_empty_and_unreadable(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    one_line_error("found an empty dataset", load_source, str(tmp_path / "empty.jsonl"))
    (tmp_path / "header.csv").write_text("text\n", encoding="utf-8")
    one_line_error("found an empty dataset", load_source, str(tmp_path / "header.csv"))
    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    one_line_error("found an empty dataset", load_source, {"path": str(tmp_path / "rows.jsonl"), "split": "train[:0]"})
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": oops}\n', encoding="utf-8")
    one_line_error("could not read it", load_source, str(tmp_path / "broken.jsonl"))
    (tmp_path / "data.xlsx").write_text("x", encoding="utf-8")
    one_line_error("found suffix '.xlsx'", load_source, str(tmp_path / "data.xlsx"))


def test_source_specs():
    assert DataSource.parse("org/name") == DataSource(path="org/name")
    src = DataSource.parse({"path": "x.jsonl", "weight": 0.5, "columns": {"a": "b"}})
    assert (src.weight, src.columns, src.split) == (0.5, {"a": "b"}, "train")
    one_line_error("unknown key 'wieght'", DataSource.parse, {"path": "x.jsonl", "wieght": 2})
    one_line_error("expected weight > 0", DataSource.parse, {"path": "x.jsonl", "weight": 0})
    one_line_error("'path' is missing", DataSource.parse, {"split": "train"})


@pytest.fixture
def two_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}", "extra": i} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(20)])
    return str(a), str(b)


def test_mixture_is_deterministic_and_weighted(two_sources):
    a, b = two_sources
    spec = [{"path": a, "weight": 0.5}, {"path": b, "weight": 2.0}]
    first = load_mixture(spec, seed=3, eval_size=10)
    again = load_mixture(spec, seed=3, eval_size=10)
    other = load_mixture(spec, seed=4, eval_size=10)
    assert first["train"]["text"] == again["train"]["text"] and first["eval"]["text"] == again["eval"]["text"]
    assert first["train"]["text"] != other["train"]["text"]
    assert first["train"].column_names == ["text"]  # 'extra' is not in every source
    assert len(first["eval"]) == 10
    train, held_out = first["train"]["text"], set(first["eval"]["text"])
    a_rows = [t for t in train if t.startswith("a")]
    b_rows = [t for t in train if t.startswith("b")]
    n_eval_a = sum(t.startswith("a") for t in held_out)
    assert len(a_rows) == round(0.5 * (100 - n_eval_a)) and len(set(a_rows)) == len(a_rows)
    assert len(b_rows) == 2 * (20 - (10 - n_eval_a))  # every remaining b row exactly twice
    assert not held_out & set(train)  # an upsampled row never lands in both splits
    assert load_mixture(spec, seed=3, eval_size=0.1)["eval"].num_rows == round(0.1 * (50 + 40))
    assert len(load_mixture([a], seed=0, eval_size=0)["eval"]) == 0


def test_mixture_errors(two_sources, tmp_path):
    a, _ = two_sources
    one_line_error("eval_size", load_mixture, [a], seed=0, eval_size=100)
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    sources_ = [str(chat), str(pc)]
    message = one_line_error("is messages data", load_mixture, sources_, seed=0, eval_size=0, stage="sft")
    assert "pc.jsonl" in message
