"""Extractive question answering as a transformers pipeline, for any ``AutoModelForQuestionAnswering``.

transformers 5.24 removed its ``question-answering`` pipeline (the task name now raises). ``pipeline()`` still
looks a task up in the model config's ``custom_pipelines`` before that check, so an encoder Quill checkpoint names
this class there (``configuration_quill.py``) and carries this file beside its weights (``modeling_quill_encoder.py``
imports it, so ``save_pretrained`` copies it): ``pipeline("question-answering", model=folder, trust_remote_code=True)``
answers as it did before, with the old pipeline's inputs and outputs::

    >>> qa = pipeline("question-answering", model="ckpt", trust_remote_code=True)
    >>> qa(question="who sat on the mat?", context="the cat sat on the mat")
    {'score': 0.71, 'start': 0, 'end': 7, 'answer': 'the cat'}

``best_spans`` is the span search on its own (start/end logits -> best spans), for evaluation loops that already
hold the logits. The tokenizer must be a fast tokenizer (offsets) that encodes (question, context) pairs.
"""

import torch
from transformers.pipelines.base import Pipeline


def best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor, max_answer_len: int, top_k: int
) -> list[tuple[float, int, int, int]]:
    """The ``top_k`` best (score, window, start token, end token) over windows of (windows, tokens) logits: start <=
    end < start + max_answer_len, both inside the context (``context_mask``); score = p(start) * p(end), each a
    softmax over the window's context tokens."""
    neg = torch.finfo(start_logits.dtype).min
    p_start = start_logits.masked_fill(~context_mask, neg).softmax(-1)
    p_end = end_logits.masked_fill(~context_mask, neg).softmax(-1)
    scores = p_start[:, :, None] * p_end[:, None, :]  # (windows, start, end)
    length = torch.arange(scores.shape[-1], device=scores.device)
    width = length[None, :] - length[:, None]  # end - start
    allowed = (width >= 0) & (width < max_answer_len)
    allowed = allowed[None] & context_mask[:, :, None] & context_mask[:, None, :]
    scores = scores.masked_fill(~allowed, -1.0).flatten()
    n = start_logits.shape[-1]
    top = scores.topk(min(top_k, int(allowed.sum()))).indices.tolist()
    return [(scores[i].item(), i // (n * n), i % (n * n) // n, i % n) for i in top]


class QuillQuestionAnsweringPipeline(Pipeline):
    """``pipe(question=..., context=...)`` (strings or equal-length lists), ``pipe({"question", "context"})`` or a
    list of such dicts -> ``{"score", "start", "end", "answer"}`` (a list of ``top_k`` of them when top_k > 1).
    Contexts longer than ``max_seq_len`` are read in overlapping windows (``doc_stride`` tokens of overlap)."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __call__(self, *args, question=None, context=None, **kwargs):
        if args:
            inputs = args[0]
        elif isinstance(question, list):
            inputs = [{"question": q, "context": c} for q, c in zip(question, context, strict=True)]
        else:
            inputs = {"question": question, "context": context}
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, top_k=None, max_answer_len=None, max_seq_len=None, doc_stride=None, **kwargs):
        preprocess = {k: v for k, v in (("max_seq_len", max_seq_len), ("doc_stride", doc_stride)) if v is not None}
        postprocess = {k: v for k, v in (("top_k", top_k), ("max_answer_len", max_answer_len)) if v is not None}
        return preprocess, {}, postprocess

    def preprocess(self, inputs, max_seq_len: int = 384, doc_stride: int = 128):
        max_seq_len = min(max_seq_len, self.tokenizer.model_max_length)
        encoded = self.tokenizer(
            inputs["question"],
            inputs["context"],
            truncation="only_second",
            max_length=max_seq_len,
            stride=min(doc_stride, max_seq_len // 2),
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=True,
            return_tensors="pt",
        )
        windows = len(encoded["input_ids"])
        context_mask = torch.tensor([[s == 1 for s in encoded.sequence_ids(i)] for i in range(windows)])
        model_inputs = {k: encoded[k] for k in self.tokenizer.model_input_names if k in encoded}
        return {
            "model_inputs": model_inputs,
            "context_mask": context_mask,
            "offsets": encoded["offset_mapping"],
            "context": inputs["context"],
        }

    def _forward(self, inputs):
        out = self.model(**inputs["model_inputs"])
        return {**inputs, "start_logits": out.start_logits, "end_logits": out.end_logits}

    def postprocess(self, outputs, top_k: int = 1, max_answer_len: int = 15):
        context, offsets = outputs["context"], outputs["offsets"]
        spans = best_spans(
            outputs["start_logits"].float(),
            outputs["end_logits"].float(),
            outputs["context_mask"],
            max_answer_len,
            4 * top_k,
        )
        answers, seen = [], set()
        for score, window, start_token, end_token in spans:  # overlapping windows can find one span twice
            start, end = int(offsets[window, start_token, 0]), int(offsets[window, end_token, 1])
            if (start, end) not in seen:
                seen.add((start, end))
                answers.append({"score": score, "start": start, "end": end, "answer": context[start:end]})
        return answers[0] if top_k == 1 else answers[:top_k]


__all__ = ["QuillQuestionAnsweringPipeline", "best_spans"]
