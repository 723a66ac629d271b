"""SQuAD v1.1 exact match and F1 (the Hub's `evaluate-metric/squad`, which wraps the official evaluation script,
offline). Answers are normalised first: lower case, punctuation and the articles a/an/the removed, whitespace
collapsed; each prediction scores its best match among the reference answers; both are percentages (0-100).

    squad.compute(
        predictions=[{"id": "1", "prediction_text": "the Eiffel tower"}],
        references=[{"id": "1", "answers": {"text": ["Eiffel Tower"], "answer_start": [12]}}],
    )  # {"exact_match": 100.0, "f1": 100.0}
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "Exact match and token F1 of extractive answers against a list of reference answers (SQuAD v1.1)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of dict): {"id": str, "prediction_text": str}.
    references (list of dict): {"id": str, "answers": {"text": list of str, "answer_start": list of int}}.
Returns:
    exact_match (float): percentage of predictions equal to a reference after normalisation.
    f1 (float): mean over questions of the best token-overlap F1 with a reference, as a percentage.
"""
_CITATION = """@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of EMNLP 2016", year = "2016", pages = "2383--2392"}"""

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official script's normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(self, predictions, references):
        answers = {ref["id"]: ref["answers"]["text"] for ref in references}
        exact, f1 = 0.0, 0.0
        for pred in predictions:
            truths = answers[pred["id"]]
            exact += max(exact_match_score(pred["prediction_text"], t) for t in truths)
            f1 += max(f1_score(pred["prediction_text"], t) for t in truths)
        n = len(predictions)
        return {"exact_match": 100.0 * exact / n, "f1": 100.0 * f1 / n}
