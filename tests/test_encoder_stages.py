"""The encoder stages end to end: `quill run tiny-encoder` at CI size (tokenizer -> mlm -> classify and qa, each also
from scratch and compared, paired), their outputs answering through pipeline() where Quill cannot be imported,
resume after a kill, whole-word masking, the label set of a ClassLabel dataset, and one-line errors for bad
labelled data.

The data is built the way `quill:encoder/` builds it (quill.data.labelled's generators), from CPython's reference
topics only, so no test pays for scanning the standard library.
"""

import json
import pydoc_data.topics
import random
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from test_remote_code import run_isolated
from tiny_outputs import REPO, is_done, stage_env

from quill.arguments import DataArguments
from quill.data.labelled import _sentences, classify_rows, load_stage_rows, qa_rows
from quill.data.tokenizer import MASK, train_tokenizer
from quill.errors import QuillError

STAGES = ["tokenizer", "mlm", "classify_scratch", "classify", "qa_scratch", "qa"]
ENCODER = (
    "{is_decoder: false, depth: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, "
    "position_embedding: learned, norm_type: layernorm, hidden_act: gelu, max_position_embeddings: 128}"
)
HELD_OUT = 16  # classify and qa rows held out


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("encoder-data")
    docs = [text.strip() for _, text in sorted(pydoc_data.topics.topics.items())]
    return {
        "docs": write_jsonl(folder / "docs.jsonl", [{"text": d} for d in docs[40:]]),
        "classify": write_jsonl(folder / "classify.jsonl", classify_rows(docs[:40], 96, random.Random(0))),
        "qa": write_jsonl(folder / "qa.jsonl", qa_rows(docs[:40], 96, random.Random(0))),
    }


def chain_overrides(data: dict[str, str]) -> list[str]:
    out = [
        "tokenizer.vocab_size=512",
        f"tokenizer.dataset_mixture=[{{path: {data['docs']}}}]",
        "tokenizer.eval_size=4",
        f"mlm.dataset_mixture=[{{path: {data['docs']}}}]",
        "mlm.eval_size=4",
        "mlm.max_length=64",
        "mlm.learning_rate=3e-3",
        "classify.max_length=48",
        "classify_scratch.max_length=48",
        "qa.max_length=64",  # contexts are longer: every question is cut into overlapping windows
        "qa_scratch.max_length=64",
        "qa.doc_stride=16",
        "qa_scratch.doc_stride=16",
    ]
    for stage in ("mlm", "classify_scratch", "qa_scratch"):
        out.append(f"{stage}.model_config={ENCODER}")
    for stage in ("classify", "classify_scratch", "qa", "qa_scratch"):
        kind = stage.removesuffix("_scratch")
        out += [f"{stage}.dataset_mixture=[{{path: {data[kind]}}}]", f"{stage}.eval_size={HELD_OUT}"]
    run = ["max_steps=6", "save_steps=2", "logging_steps=1", "warmup_steps=0", "use_cpu=true", "seed=0"]
    return out + run + ["per_device_train_batch_size=4", "per_device_eval_batch_size=8", "dataloader_num_workers=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    base = tmp_path_factory.mktemp("encoder-run")
    out, env = base / "tiny-encoder", stage_env(base)
    cmd = [sys.executable, "-m", "quill.cli", "run", "tiny-encoder", "--output-dir", str(out), *chain_overrides(data)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, env


def metrics(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "metrics.json").read_text())


def test_every_stage_finishes_and_the_comparison_is_paired_on_the_same_rows(run):
    out, _ = run
    assert all(is_done(out / s) for s in STAGES)
    mlm = metrics(out, "mlm")
    assert mlm["eval_loss"] < mlm["eval_loss_before"] - 0.05, mlm  # six steps of masked-LM training lower it
    scratch, tuned = metrics(out, "classify_scratch"), metrics(out, "classify")
    assert 0 <= tuned["eval_accuracy"] <= 1 and 0 <= tuned["eval_macro_f1"] <= 1 and tuned["eval_rows"] == HELD_OUT
    # The paired comparison scored the scratch model itself, on the same held-out rows: its accuracy there is the
    # one the scratch stage measured, and the pretrained side is this stage's own.
    assert tuned["accuracy_vs_classify_scratch_n"] == HELD_OUT
    assert tuned["accuracy_vs_classify_scratch_from"] == pytest.approx(scratch["eval_accuracy"])
    assert tuned["accuracy_vs_classify_scratch_to"] == pytest.approx(tuned["eval_accuracy"])
    assert 0 <= tuned["accuracy_vs_classify_scratch_p"] <= 1
    qa_scratch, qa = metrics(out, "qa_scratch"), metrics(out, "qa")
    assert qa["eval_questions"] == HELD_OUT and 0 <= qa["eval_exact_match"] <= qa["eval_f1"] <= 100
    assert qa["exact_match_vs_qa_scratch_from"] * 100 == pytest.approx(qa_scratch["eval_exact_match"])
    assert qa["exact_match_vs_qa_scratch_to"] * 100 == pytest.approx(qa["eval_exact_match"])
    config = json.loads((out / "classify" / "config.json").read_text())
    assert config["id2label"] == {"0": "natural", "1": "shuffled"} and config["is_decoder"] is False


def test_outputs_answer_through_pipelines_without_the_project(run, tmp_path):
    out, _ = run
    result = run_isolated(
        f"""
        import json
        from transformers import pipeline
        fill = pipeline("fill-mask", model={str(out / "mlm")!r}, trust_remote_code=True)
        label = pipeline("text-classification", model={str(out / "classify")!r}, trust_remote_code=True)
        qa = pipeline("question-answering", model={str(out / "qa")!r}, trust_remote_code=True)
        context = "The return statement leaves the current function call with an expression list."
        answer = qa(question='What follows "leaves the current"?', context=context)
        print(json.dumps({{
            "fill": [c["token_str"] for c in fill("The return <|mask|> leaves the current function.")],
            "label": label("Return the value of the attribute.")[0]["label"],
            "span": context[answer["start"]:answer["end"]] == answer["answer"], "answer": answer["answer"],
        }}))
        """,
        tmp_path,
    )
    assert len(result["fill"]) == 5 and result["label"] in {"natural", "shuffled"}
    assert result["span"] and result["answer"], result


def test_whole_word_masking_masks_every_token_of_a_picked_word(tmp_path):
    from quill.stages.mlm import MaskingCollator, MLMConfig, rows

    docs = [t.strip() for _, t in sorted(pydoc_data.topics.topics.items())]
    tokenizer = train_tokenizer(docs[8:], vocab_size=512, mask_token=MASK)
    docs = docs[:8]

    def config(whole: bool) -> MLMConfig:
        return MLMConfig(output_dir=str(tmp_path), max_length=64, mlm_probability=0.3, whole_word_mask=whole,
                         use_cpu=True, report_to="none")  # fmt: skip

    batch = rows(docs, tokenizer, config(True))
    ids = torch.tensor([r["input_ids"] for r in batch])
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    opens = MaskingCollator(tokenizer, config(True), seed=0).opens_word[ids].bool() | special
    # Word index of every token: a new word at each token that starts with whitespace or follows a special token.
    word = (opens | special.roll(1, dims=1)).cumsum(dim=1)
    for whole in (True, False):
        collated = MaskingCollator(tokenizer, config(whole), seed=0)(batch)
        masked = collated["labels"] != -100
        assert not masked[special].any()  # special tokens are never picked
        assert (collated["labels"][masked] == ids[masked]).all()  # labels are the original tokens
        partial = 0  # words with some tokens masked and some not
        for row in range(len(batch)):
            for w in word[row][masked[row]].unique():
                in_word = (word[row] == w) & ~special[row]
                partial += int(masked[row][in_word].any() and not masked[row][in_word].all())
        if whole:
            assert masked.sum() > 0 and partial == 0  # a picked word is masked whole, and only by the mask token
            assert (collated["input_ids"][masked] == tokenizer.mask_token_id).all()
            # Words are picked one by one: a document piece holds masked and unmasked words side by side (were the
            # offsets to join a whole piece into one "word", it would be masked or kept in one block).
            piece = special.cumsum(dim=1)
            mixed = sum(
                bool(masked[row][(piece[row] == k) & ~special[row]].any())
                and not bool(masked[row][(piece[row] == k) & ~special[row]].all())
                for row in range(len(batch))
                for k in piece[row].unique()
            )
            assert mixed > 0
        else:
            assert partial > 0  # token-level masking splits words: the option is what changes it


def test_the_classification_set_pairs_sentences_as_written_with_their_words_shuffled():
    docs = [text.strip() for _, text in sorted(pydoc_data.topics.topics.items())][:40]
    rows = classify_rows(docs, 96, random.Random(0))
    flat = " ".join(" ".join(d.split()) for d in docs)
    bags = {tuple(sorted(s)) for d in docs for s in _sentences(d, 5, 32)}
    labels = [r["label"] for r in rows]
    assert len(rows) == 96 and labels.count("natural") == labels.count("shuffled") == 48
    for row in rows:
        text = row["text"].rstrip(".")
        assert tuple(sorted(text.split())) in bags  # the words of one sentence of the documents
        assert (text in flat) == (row["label"] == "natural")  # as written, or in another order


def test_classlabel_names_are_the_label_set(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"text": [f"text {i}" for i in range(8)], "label": [i % 2 for i in range(8)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    data_args = DataArguments(dataset_mixture=[str(tmp_path / "saved")], eval_size=2)
    splits, labels = load_stage_rows(data_args, "classify")
    assert labels == ["neg", "pos"]
    by_text = {r["text"]: r["label"] for split in splits.values() for r in split}
    assert by_text == {f"text {i}": i % 2 for i in range(8)}  # ids keep their ClassLabel meaning
    with pytest.raises(QuillError, match=r"labels is \['pos', 'neg'\] but the dataset's ClassLabel names are"):
        load_stage_rows(data_args, "classify", labels=["pos", "neg"])


def bad_classify_rows() -> list[dict]:
    return [{"text": f"sentence {i}", "label": ["natural", "shuffled"][i % 2]} for i in range(6)]


def bad_qa_rows() -> list[dict]:
    context = "The quick brown fox jumps over the lazy dog."
    rows = [{"context": context, "question": "Who jumps?", "answers": {"text": ["fox"], "answer_start": [16]}}] * 4
    rows[2] = {**rows[2], "answers": {"text": ["fox"], "answer_start": [3]}}
    return rows


BAD_DATA = {
    "missing label column": (
        "classify",
        [{"text": r["text"], "category": r["label"]} for r in bad_classify_rows()],
        [],
        r"column 'label' is missing \(found columns \['text', 'category'\]\); fix: rename the column that holds it "
        r"with `columns: \{<your column>: label\}`",
    ),
    "label outside the label set": (
        "classify",
        bad_classify_rows()[:3] + [{"text": "sentence 3", "label": "maybe"}] + bad_classify_rows()[4:],
        ["labels=[natural, shuffled]"],
        r"row 3, column 'label': 'maybe' is not in the label set \['natural', 'shuffled'\]; fix: add 'maybe' to "
        r"`labels`, or fix or drop the row",
    ),
    "answer not a span of its context": (
        "qa",
        bad_qa_rows(),
        [],
        r"row 2, column 'answers': answer 'fox' at answer_start 3 is not a span of the context; fix: set "
        r"answer_start to 16, where the answer text starts in the context",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_labelled_data_is_one_line_exit_2(case, tmp_path):
    stage, rows, extra, message = BAD_DATA[case]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    argv = [f"dataset_mixture=[{{path: {path}}}]", "eval_size=2", f"output_dir={tmp_path / 'out'}", "use_cpu=true"]
    cmd = [sys.executable, "-m", f"quill.stages.{stage}", *argv, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=stage_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert path in lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mlm", "classify", "qa"])
def test_a_killed_stage_resumes_to_the_uninterrupted_weights(run, stage):
    from test_resume import assert_same_weights, kill_after_checkpoint

    out, env = run
    record = json.loads((out / "quill_run.json").read_text())
    command = next(s["command"] for s in record["stages"] if s["name"] == stage)
    resumed = out / f"{stage}_resumed"  # a sibling: classify and qa find the stage they are paired with
    command = [a if not a.startswith("output_dir=") else f"output_dir={resumed}" for a in command]
    # Paired with the uninterrupted run of itself: the same weights must give the same answer on every held-out row,
    # which checks that the paired comparison lines the two models' rows up.
    paired = {"classify": "accuracy_vs_classify", "qa": "exact_match_vs_qa"}.get(stage)
    command += [f"paired_with={stage}"] if paired else []
    kill_after_checkpoint(command, env, resumed)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "checkpoint-2" in proc.stderr
    assert is_done(resumed)
    assert_same_weights(resumed, out / stage)
    if paired:
        result = metrics(out, resumed.name)
        assert result[f"{paired}_n"] == HELD_OUT and result[f"{paired}_gained"] == result[f"{paired}_lost"] == 0
