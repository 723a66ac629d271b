"""The seq2seq stage: trains an encoder-decoder end to end from source/target files, resumes after a SIGKILL with
the weights of an uninterrupted run, reads Hub translation rows in the direction asked, stops bad data with one
line; its BLEU/chrF module gives sacrebleu's own numbers."""

import json
import random
import sys

import datasets
import evaluate
import pytest
import sacrebleu
from test_resume import assert_same_weights, kill_after_checkpoint, run_ok
from tiny_model import save_checkpoint, tiny_tokenizer
from tiny_outputs import is_done, stage_env
from transformers import AutoModelForSeq2SeqLM

from quill.options import parse_stage_args
from quill.output import mark_done
from quill.stages import seq2seq

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "what", "is", "two", "plus", "four"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("seq2seq")
    tiny_tokenizer().save_pretrained(base / "tok")
    rng = random.Random(0)
    rows = []
    for _ in range(96):
        words = rng.sample(WORDS, rng.randint(2, 4))
        rows.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    (base / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return base


def argv(data, out, *extra) -> list[str]:
    return [
        f"dataset_mixture=[{{path: {data / 'pairs.jsonl'}}}]",
        "eval_size=8",
        f"tokenizer_name_or_path={data / 'tok'}",
        "model_config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2}",
        f"output_dir={out}",
        "per_device_train_batch_size=4",
        "per_device_eval_batch_size=8",
        "learning_rate=3e-3",
        "max_steps=6",
        "save_steps=2",
        "logging_steps=2",
        "train_sampling_strategy=group_by_length",
        "max_target_length=12",
        "report_to=none",
        "use_cpu=true",
        "seed=0",
        *extra,
    ]


def test_trains_end_to_end_and_resumes_exactly_after_a_kill(data, tmp_path):
    env = stage_env(tmp_path)
    cmd = [sys.executable, "-m", "quill.stages.seq2seq"]
    whole = tmp_path / "whole"
    run_ok([*cmd, *argv(data, whole)], env)
    assert is_done(whole)
    metrics = json.loads((whole / "metrics.json").read_text())
    for name in ("loss", "bleu", "chrf", "exact_match"):
        assert f"eval_{name}_before" in metrics and f"eval_{name}" in metrics
    assert metrics["eval_loss"] < metrics["eval_loss_before"]  # it learned something in 6 steps
    assert metrics["train_steps"] == 6
    model = AutoModelForSeq2SeqLM.from_pretrained(whole)
    assert type(model).__name__ == "QuillForConditionalGeneration"

    killed = tmp_path / "killed"
    kill_after_checkpoint([*cmd, *argv(data, killed)], env, killed, step=2)
    proc = run_ok([*cmd, *argv(data, killed)], env)
    assert "resuming from" in proc.stderr and "checkpoint-2" in proc.stderr
    assert_same_weights(whole, killed)


def test_reads_translation_pairs_in_the_direction_asked(data):
    tokenizer = tiny_tokenizer()
    rows = datasets.Dataset.from_list([{"translation": {"de": "der schnelle fuchs", "en": "the quick fox"}}])
    args = seq2seq.Seq2SeqConfig(output_dir="unused", source_lang="de", target_lang="en", report_to="none")
    tokenized = seq2seq.tokenize_pairs(rows, tokenizer, args, "test")
    assert tokenizer.decode(tokenized[0]["input_ids"], skip_special_tokens=True) == "der schnelle fuchs"
    assert tokenized[0]["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokenized[0]["labels"], skip_special_tokens=True) == "the quick fox"
    args.source_lang, args.target_lang = "en", "de"
    reverse = seq2seq.tokenize_pairs(rows, tokenizer, args, "test")
    assert tokenizer.decode(reverse[0]["input_ids"], skip_special_tokens=True) == "the quick fox"


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"text": "a b", "label": "b a"}], [], "expected columns 'source' and 'target' (missing 'source')"),
        ([{"source": "a b", "target": "b a"}, {"source": "c d", "target": "  "}], [], "row 1: expected a non-empty"),
        ([{"source": "a b", "target": "b a"}], ["source_lang=de", "target_lang=en"], "need a `translation` column"),
        ([{"translation": {"de": "a b", "fr": "b a"}}], ["source_lang=de", "target_lang=en"], "translation.en"),
    ],
)
def test_bad_data_is_one_line(data, tmp_path, capsys, rows, extra, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    args = [a for a in argv(data, tmp_path / "out") if not a.startswith(("dataset_mixture", "eval_size"))]
    with pytest.raises(SystemExit) as exit_info:
        seq2seq.main([*args, f"dataset_mixture=[{{path: {path}}}]", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "fix: " in err[-1]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_bleu_and_chrf_module_gives_sacrebleus_numbers():
    # sacrebleu's README example: two reference streams; its published scores are BLEU 48.53 and chrF2 59.73.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    metric = evaluate.load(seq2seq.METRIC_MODULE)
    scores = metric.compute(predictions=hyps, references=[list(r) for r in zip(*refs)])
    assert scores["bleu"] == sacrebleu.corpus_bleu(hyps, refs).score
    assert scores["chrf"] == sacrebleu.corpus_chrf(hyps, refs).score
    assert round(scores["bleu"], 2) == 48.53 and round(scores["chrf"], 2) == 59.73
    assert scores["exact_match"] == pytest.approx(100 / 3)  # the first hypothesis equals a reference
    # One reference per prediction, as plain strings; chrF++ through the module's option.
    one = metric.compute(predictions=hyps, references=refs[0], chrf_word_order=2)
    assert one["bleu"] == sacrebleu.corpus_bleu(hyps, [refs[0]]).score
    assert one["chrf"] == sacrebleu.corpus_chrf(hyps, [refs[0]], word_order=2).score


def test_paired_with_a_decoder_only_model_on_the_same_prompts(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_checkpoint(tmp_path / "decoder")  # a decoder-only chat model with the same tokenizer, as a finished stage
    mark_done(tmp_path / "decoder", {"stage": "sft"})
    rows = [{"prompt": f"{a} {b} {c}", "answer": f"{c} {b} {a}"} for a, b, c in [WORDS[i : i + 3] for i in range(6)]]
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(json.dumps(r) for r in rows))
    options = argv(data, tmp_path / "seq2seq", f"task_eval={{path: {heldout}}}", "paired_with=decoder", "max_steps=2")
    metrics = seq2seq.train(*parse_stage_args(seq2seq.ARG_TYPES, options))
    assert metrics["exact_match_vs_decoder_n"] == len(rows)
    for name in ("bleu", "chrf", "exact_match"):
        assert f"decoder_heldout_{name}" in metrics and f"heldout_{name}" in metrics
    # The pairing scores this model's own held-out answers: its side equals the stage's exact match.
    assert 100 * metrics["exact_match_vs_decoder_to"] == pytest.approx(metrics["heldout_exact_match"])
    assert 100 * metrics["exact_match_vs_decoder_from"] == pytest.approx(metrics["decoder_heldout_exact_match"])
    assert not any(k.startswith("_") for k in metrics)  # the per-row answers are not saved
