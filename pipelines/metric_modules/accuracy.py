"""Accuracy: the fraction of predictions equal to their reference (the Hub's `evaluate-metric/accuracy`, offline).

evaluate.load(".../accuracy.py").compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {"accuracy": 0.667}
"""

import datasets
import evaluate

_DESCRIPTION = "Accuracy = correct predictions / all predictions (or the weighted share with sample_weight)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): True (default) returns the fraction correct, False the number (or weight) correct.
    sample_weight (list of float): per-example weights; default: all 1.
Returns:
    accuracy (float): in [0, 1] with normalize=True.
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        weights = [1.0] * len(references) if sample_weight is None else [float(w) for w in sample_weight]
        correct = sum(w for p, r, w in zip(predictions, references, weights, strict=True) if p == r)
        return {"accuracy": float(correct / sum(weights) if normalize else correct)}
