"""Corpus BLEU and chrF through sacrebleu (the numbers of the Hub's `evaluate-metric/sacrebleu` and
`evaluate-metric/chrf`, in one offline module), plus exact match, for generated text against references.

    evaluate.load(".../bleu_chrf.py").compute(predictions=["the cat sat"], references=[["the cat sat"]])
    # {"bleu": 100.0, "chrf": 100.0, "exact_match": 100.0, ...}

References are one string per prediction, or a list of strings (several references; every prediction must have
the same number, as sacrebleu requires). BLEU uses sacrebleu's defaults (13a tokenizer, exponential smoothing);
chrF is chrF2 (character 6-grams, beta 2), or chrF++ with ``chrf_word_order=2``. Exact match compares the
whitespace-stripped texts, against any reference. All three are percentages (0-100).
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU and chrF (sacrebleu) and exact match of generated text against one or more references."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str, or list of list of str): the reference(s) of each prediction.
    tokenize (str): BLEU's tokenizer, as sacrebleu names them ("13a" default, "intl", "char", "zh", "none", ...).
    lowercase (bool): case-insensitive BLEU and chrF (default False).
    chrf_word_order (int): 0 for chrF (default), 2 for chrF++.
Returns:
    bleu (float), chrf (float), exact_match (float): percentages.
    bleu_precisions (list of float), bleu_brevity_penalty (float), sys_len (int), ref_len (int): BLEU's parts.
"""
_CITATION = """@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores", author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation", year = "2018", pages = "186--191"}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BleuChrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, tokenize=None, lowercase=False, chrf_word_order=0):
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        counts = {len(r) for r in refs}
        if len(counts) > 1:
            raise ValueError(f"every prediction needs the same number of references, found {sorted(counts)}")
        streams = [list(stream) for stream in zip(*refs)]  # sacrebleu takes one list per reference position
        bleu = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase).corpus_score(predictions, streams)
        chrf = sacrebleu.CHRF(word_order=chrf_word_order, lowercase=lowercase).corpus_score(predictions, streams)
        exact = sum(p.strip() in {r.strip() for r in rs} for p, rs in zip(predictions, refs, strict=True))
        return {
            "bleu": bleu.score,
            "chrf": chrf.score,
            "exact_match": 100.0 * exact / len(predictions) if predictions else 0.0,
            "bleu_precisions": list(bleu.precisions),
            "bleu_brevity_penalty": bleu.bp,
            "sys_len": bleu.sys_len,
            "ref_len": bleu.ref_len,
        }
