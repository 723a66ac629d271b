"""`quill run <GPU recipe> --smoke`: every stage of each GPU recipe (gpt2-124m, bert-base, t5-small) runs, for a few
steps at tiny size on one CPU process, on the real-schema copies of its Hub datasets (tests/hub_datasets.py) served
by the loopback Hub."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_outputs import REPO, is_done

from quill.recipe import load_recipe, plan_recipe


def run_smoke(hub, tmp_path, recipe: str, stages: tuple[str, ...]):
    """Run the recipe with --smoke; check every stage finished; return (output folder, Hub dataset repos read)."""
    out = tmp_path / f"{recipe}-smoke"
    env = hub.env(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "quill.cli", "run", f"recipes/{recipe}", "--smoke", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:  # the runner's last lines name the failing stage and its one-line error
        pytest.fail(f"{' '.join(cmd[2:])} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    for stage in stages:
        assert is_done(out / stage), stage
    fetched = {r["path"].split("/resolve/")[0] for r in hub.log if "/resolve/" in r["path"]}
    return out, fetched


def config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_smoke_shrinks_every_layer_count_of_a_model_config(tmp_path):
    # t5-small sets num_hidden_layers and num_decoder_layers beside the width: both follow the smoke depth.
    plans = plan_recipe(load_recipe(REPO / "recipes" / "t5-small"), tmp_path, smoke=True)
    argv = next(p.argv for p in plans if p.spec.name == "seq2seq")
    model = json.loads(next(a for a in argv if a.startswith("model_config="))[len("model_config=") :])
    assert (model["hidden_size"], model["num_hidden_layers"], model["num_decoder_layers"]) == (32, 1, 1), model
    assert model["hidden_act"] == "relu"  # the recipe's architecture choices stay


@pytest.mark.slow
def test_gpt2_124m_smoke_runs_every_stage_on_real_schema_data(hub_with_datasets, tmp_path):
    stages = ("tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "student", "distill")
    out, fetched = run_smoke(hub_with_datasets, tmp_path, "gpt2-124m", stages)
    assert config(out / "pretrain")["hidden_size"] == 32  # tiny, not 124M
    assert config(out / "distill")["hidden_size"] == 32 and config(out / "distill")["num_hidden_layers"] == 1
    # The distilled student was scored beside its teacher (the rl stage) and its SFT control on the held-out prompts.
    assert {"task_accuracy", "teacher_task_accuracy", "control_task_accuracy"} <= metrics(out / "distill").keys()
    sources = json.loads((out / "distill" / "quill_stage.json").read_text())["fingerprint"]["sources"]
    assert sources["teacher_model_name_or_path"]["stage"] == str(out / "rl")  # the chain's final policy
    assert sources["model_name_or_path"]["stage"] == str(out / "student")
    for repo in ("fineweb-edu", "smoltalk", "ultrafeedback_binarized"):
        assert any(repo in path for path in fetched), (repo, fetched)  # the data came from the loopback Hub


@pytest.mark.slow
def test_bert_base_smoke_runs_every_stage_on_real_schema_data(hub_with_datasets, tmp_path):
    out, fetched = run_smoke(hub_with_datasets, tmp_path, "bert-base", ("tokenizer", "mlm", "classify", "qa"))
    mlm = config(out / "mlm")
    assert (mlm["hidden_size"], mlm["num_hidden_layers"]) == (32, 1)  # tiny, not bert-base's 768 x 12
    assert (mlm["is_decoder"], mlm["norm_position"], mlm["position_embedding"]) == (False, "post", "learned")
    # SST-2's ClassLabel names became the classifier's labels; SQuAD's nested answers were read as spans.
    assert config(out / "classify")["id2label"] == {"0": "negative", "1": "positive"}
    assert "eval_accuracy" in metrics(out / "classify")
    assert "eval_exact_match" in metrics(out / "qa")
    for repo in ("fineweb-edu", "nyu-mll/glue", "rajpurkar/squad"):
        assert any(repo in path for path in fetched), (repo, fetched)


@pytest.mark.slow
def test_t5_small_smoke_runs_every_stage_on_real_schema_data(hub_with_datasets, tmp_path):
    out, fetched = run_smoke(hub_with_datasets, tmp_path, "t5-small", ("tokenizer", "seq2seq"))
    model = config(out / "seq2seq")
    assert model["is_encoder_decoder"] is True
    assert (model["hidden_size"], model["num_hidden_layers"], model["num_decoder_layers"]) == (32, 1, 1)
    scores = metrics(out / "seq2seq")
    assert {"eval_bleu", "eval_chrf"} <= scores.keys(), scores  # generated translations, scored
    for repo in ("fineweb-edu", "fineweb-2", "wmt/wmt14"):
        assert any(repo in path for path in fetched), (repo, fetched)


GLUE_SPLITS = """
    from quill.data.labelled import check_classification
    from quill.data.sources import load_source
    from quill.errors import QuillError

    def sst2(split):
        source = {"path": "nyu-mll/glue", "name": "sst2", "split": split, "columns": {"sentence": "text"}}
        return load_source({**source, "max_samples": 16})

    print("LABELS", check_classification(sst2("validation"), "nyu-mll/glue"))
    try:
        check_classification(sst2("test"), "nyu-mll/glue")
    except QuillError as e:
        print("ERROR", e.problem, "| fix:", e.fix)
"""


def test_glue_test_split_has_no_labels_and_says_so(hub_with_datasets):
    # SST-2's label is a ClassLabel (read from the Hub as a capped stream, its names kept); its test split's labels
    # are -1, datasets' "no label": a user who picks it is told so, not asked to add -1 to the label set.
    out = hub_with_datasets.run_python(GLUE_SPLITS).stdout
    assert "LABELS ['negative', 'positive']" in out, out
    assert "row 0, column 'label': -1 is a ClassLabel's 'no label'" in out and "split: train" in out, out
