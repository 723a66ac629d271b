"""F1 = 2 * precision * recall / (precision + recall), per class and averaged (the Hub's `evaluate-metric/f1`, which
is scikit-learn's f1_score, offline and without scikit-learn).

    evaluate.load(".../f1.py").compute(predictions=[0, 2, 1], references=[0, 1, 1], average="macro")

A class with no true and no predicted examples scores 0 (scikit-learn's zero_division default).
"""

import datasets
import evaluate

_DESCRIPTION = "F1 score of a classifier: binary (of pos_label), or averaged over classes (macro, micro, weighted)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    labels (list of int): the classes to average over; default: every label in references or predictions, sorted.
    pos_label (int): the positive class of average="binary" (default 1).
    average (str): "binary" (default), "macro" (unweighted mean over classes), "micro" (from the pooled counts, equal
        to accuracy for single-label data), "weighted" (mean weighted by each class's number of references), or None
        (a list, one F1 per class).
    sample_weight (list of float): per-example weights; default: all 1.
Returns:
    f1 (float, or list of float with average=None).
"""
_CITATION = ""
AVERAGES = ("binary", "macro", "micro", "weighted", None)


def _f1(tp: float, fp: float, fn: float) -> float:
    # 2PR/(P+R) written with counts: no division by zero when a class is never predicted or never true.
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, found {average!r}")
        weights = [1.0] * len(references) if sample_weight is None else [float(w) for w in sample_weight]
        if average == "binary":
            present = set(references) | set(predictions)
            if not present <= {0, 1, pos_label}:
                raise ValueError(f"average='binary' needs two classes, found {sorted(present)}; use average='macro'")
            labels = [pos_label]
        elif labels is None:
            labels = sorted(set(references) | set(predictions))
        counts = {label: [0.0, 0.0, 0.0] for label in labels}  # tp, fp, fn
        for p, r, w in zip(predictions, references, weights, strict=True):
            if p == r and p in counts:
                counts[p][0] += w
                continue
            if p in counts:
                counts[p][1] += w
            if r in counts:
                counts[r][2] += w
        scores = [_f1(*counts[label]) for label in labels]
        if average in ("binary", "macro"):
            f1 = sum(scores) / len(scores) if scores else 0.0
        elif average == "micro":
            f1 = _f1(*(sum(c[i] for c in counts.values()) for i in range(3)))
        elif average == "weighted":
            support = [counts[label][0] + counts[label][2] for label in labels]
            f1 = sum(s * n for s, n in zip(scores, support)) / sum(support) if sum(support) else 0.0
        else:
            return {"f1": [float(s) for s in scores]}
        return {"f1": float(f1)}
