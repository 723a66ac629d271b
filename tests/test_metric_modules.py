"""The `evaluate` metric modules shipped in quill.metric_modules: they load by path with no network, and their
numbers agree with scikit-learn (accuracy, F1) and with SQuAD v1.1 cases worked by hand (exact match, F1)."""

import json
import os
import random
import subprocess
import sys

import pytest
from sklearn.metrics import accuracy_score, f1_score

from quill import metric_modules
from quill.errors import QuillError


@pytest.fixture(scope="module")
def modules():
    return {name: metric_modules.load(name) for name in ("accuracy", "f1", "squad")}


def test_modules_load_offline_by_path_in_a_fresh_process(tmp_path):
    # A dead endpoint and offline mode: a module that reached for the Hub would fail here.
    code = (
        "import evaluate, json; from quill import metric_modules as m\n"
        "acc = evaluate.load(m.path('accuracy')).compute(predictions=[1, 0, 1], references=[1, 1, 1])\n"
        "sq = m.load('squad').compute(predictions=[{'id': 'a', 'prediction_text': 'x'}],"
        " references=[{'id': 'a', 'answers': {'text': ['x'], 'answer_start': [0]}}])\n"
        "print(json.dumps([acc, m.load('f1').compute(predictions=[1, 0], references=[1, 1]), sq]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc, f1, squad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert acc == {"accuracy": pytest.approx(2 / 3)}
    assert f1 == {"f1": pytest.approx(2 / 3)}  # binary F1 of class 1: precision 1, recall 1/2
    assert squad == {"exact_match": 100.0, "f1": 100.0}


def test_unknown_module_is_a_one_line_error():
    with pytest.raises(QuillError, match="no shipped metric module named 'rouge'"):
        metric_modules.path("rouge")


def random_labels(seed: int, n: int, classes: int) -> tuple[list[int], list[int], list[float]]:
    rng = random.Random(seed)
    refs = [rng.randrange(classes) for _ in range(n)]
    preds = [r if rng.random() < 0.6 else rng.randrange(classes) for r in refs]
    return preds, refs, [rng.uniform(0.1, 2.0) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_agrees_with_sklearn(modules, seed):
    preds, refs, weights = random_labels(seed, 97, 4)
    accuracy = modules["accuracy"]
    assert accuracy.compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(
        accuracy_score(refs, preds)
    )
    weighted = accuracy.compute(predictions=preds, references=refs, sample_weight=weights)["accuracy"]
    assert weighted == pytest.approx(accuracy_score(refs, preds, sample_weight=weights))
    count = accuracy.compute(predictions=preds, references=refs, normalize=False)["accuracy"]
    assert count == accuracy_score(refs, preds, normalize=False)


@pytest.mark.parametrize("average", ["macro", "micro", "weighted", None])
@pytest.mark.parametrize("seed", [0, 1])
def test_f1_agrees_with_sklearn(modules, average, seed):
    preds, refs, weights = random_labels(seed, 83, 5)
    preds = [p if p != 4 else 3 for p in preds]  # class 4 is never predicted: its F1 is 0, as in sklearn
    f1 = modules["f1"]
    ours = f1.compute(predictions=preds, references=refs, average=average)["f1"]
    assert ours == pytest.approx(f1_score(refs, preds, average=average, zero_division=0.0))
    ours = f1.compute(predictions=preds, references=refs, average=average, sample_weight=weights)["f1"]
    assert ours == pytest.approx(f1_score(refs, preds, average=average, sample_weight=weights, zero_division=0.0))


def test_binary_f1_agrees_with_sklearn_and_refuses_more_classes(modules):
    preds, refs, _ = random_labels(3, 61, 2)
    f1 = modules["f1"]
    assert f1.compute(predictions=preds, references=refs)["f1"] == pytest.approx(f1_score(refs, preds))
    assert f1.compute(predictions=preds, references=refs, pos_label=0)["f1"] == pytest.approx(
        f1_score(refs, preds, pos_label=0)
    )
    with pytest.raises(ValueError, match="average='binary' needs two classes"):
        f1.compute(predictions=[0, 1, 2], references=[0, 1, 2])


def squad(modules, pairs: list[tuple[str, list[str]]]) -> dict:
    predictions = [{"id": str(i), "prediction_text": p} for i, (p, _) in enumerate(pairs)]
    references = [
        {"id": str(i), "answers": {"text": truths, "answer_start": [0] * len(truths)}}
        for i, (_, truths) in enumerate(pairs)
    ]
    return modules["squad"].compute(predictions=predictions, references=references)


def test_squad_exact_match_and_f1_worked_by_hand(modules):
    # Normalisation: case, punctuation and the articles a/an/the do not count.
    assert squad(modules, [("The Eiffel Tower!", ["eiffel tower"])]) == {"exact_match": 100.0, "f1": 100.0}
    # "in paris france" vs "paris": 1 token in common, precision 1/3, recall 1 -> F1 = 2 * (1/3) / (4/3) = 0.5.
    assert squad(modules, [("in Paris, France", ["Paris"])]) == {"exact_match": 0.0, "f1": pytest.approx(50.0)}
    # The best of several references counts: exact against the second one.
    assert squad(modules, [("blue whale", ["whale shark", "the blue whale"])]) == {"exact_match": 100.0, "f1": 100.0}
    # Tokens are a multiset, counted after the article "a" is dropped: "b b" vs "b c" share one "b": precision 1/2,
    # recall 1/2, F1 1/2.
    assert squad(modules, [("a b b", ["b c"])]) == {"exact_match": 0.0, "f1": pytest.approx(50.0)}
    # No overlap scores 0; the scores are means over questions, as percentages.
    both = squad(modules, [("cat", ["dog"]), ("in Paris, France", ["Paris"])])
    assert both == {"exact_match": 0.0, "f1": pytest.approx(25.0)}
