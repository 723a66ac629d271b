"""`evaluate` metric modules shipped inside Quill, so the encoder stages' metrics work offline.

`evaluate.load("accuracy")` fetches its script from the Hub; these are the same metrics as local scripts, loaded by
path, with the Hub modules' inputs and outputs (drop-in for `evaluate.load("accuracy" | "f1" | "squad")`; the
seq2seq stage's `bleu_chrf` is sacrebleu's BLEU and chrF):

    from quill import metric_modules
    f1 = metric_modules.load("f1")          # == evaluate.load(metric_modules.path("f1"))
    f1.compute(predictions=[0, 1], references=[0, 0], average="macro")

Each module is one file (`<name>.py`), which `evaluate.load(path)` accepts as it stands.
"""

from pathlib import Path

from quill.errors import QuillError

# Every module file of this folder (accuracy, f1, squad; bleu_chrf for the seq2seq stage).
NAMES = tuple(sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem != "__init__"))


def path(name: str) -> str:
    """The script of metric `name`, for `evaluate.load(path)`."""
    if name not in NAMES:
        raise QuillError(f"no shipped metric module named {name!r}", f"use one of {', '.join(NAMES)}")
    return str(Path(__file__).with_name(f"{name}.py"))


def load(name: str, **kwargs):
    """`evaluate.load` of the shipped module `name` (keyword arguments as evaluate.load takes them)."""
    import evaluate

    return evaluate.load(path(name), **kwargs)
