"""Held-out metrics that stages record and tools report: loss and bits per byte on text, greedy task accuracy,
reward-model scores, and the generation helpers they share; preference accuracy (DPO's implicit reward, a reward
model's ranking) comes from TRL's own trainers (`preference_eval`).

Every function here runs under `torch.no_grad()` in eval mode (the model's mode is restored afterwards), batches its
inputs, and generates greedily with a bounded `max_new_tokens`, so a stage can call it before and after training.
"""

import math
import warnings
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from quill.data.tokenizer import stop_token_ids
from quill.errors import QuillError

# -- small helpers ---------------------------------------------------------------------------------------------


@contextmanager
def _inference(model):
    """Eval mode and no grad for the duration; a model called mid-training goes back to train mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _pad(tokenizer, seqs: list[list[int]], side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokenizer.pad` on the given side for this call only: the caller's tokenizer (its padding_side) is left as is.
    Every tokenizer a stage holds has a pad token (`quill.loading.load_tokenizer` sets EOS where there is none)."""
    batch = tokenizer.pad({"input_ids": seqs}, padding_side=side, return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generation_stops(model, tokenizer) -> list[int]:
    """Where a reply ends: the model's generation_config eos ids, then the tokenizer's end-of-turn ids."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    return list(dict.fromkeys(i for i in ids + stop_token_ids(tokenizer) if isinstance(i, int)))


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, tok in enumerate(ids):
        if tok in stops:
            return ids[:i]
    return ids


def _as_messages(answer) -> list[dict]:
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A chat prompt (message list) through the chat template, up to the assistant header; a plain string as is."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        raise QuillError(
            "the tokenizer has no chat template, so chat prompts cannot be rendered",
            fix="use a tokenizer with a chat_template (Quill's tokenizer stage adds one)",
        )
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS itself


def _tokenize(tokenizer, content, **template_kwargs) -> list[int]:
    if isinstance(content, str):
        return tokenizer(content)["input_ids"]
    return tokenizer(
        tokenizer.apply_chat_template(content, tokenize=False, **template_kwargs), add_special_tokens=False
    )["input_ids"]


# -- held-out text ---------------------------------------------------------------------------------------------


def heldout_loss(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> dict:
    """Mean nats per token and bits per byte over `texts`.

    Scored tokens: every token of each text (tokenized without special tokens), each predicted from one leading
    BOS (EOS for tokenizers without one) plus the text before it. No EOS is appended, so the nats belong exactly
    to the text's UTF-8 bytes: bits_per_byte = total nats / ln 2 / total bytes. Texts longer than `max_length`
    are cut into windows of `max_length` that overlap by one token, so each token is scored exactly once, with up
    to `max_length - 1` tokens of context.

    Not the stages' `eval_loss` (quill.stages.distributed.eval_loss), on purpose: that one is the training objective
    on the stage's own collated eval rows (packed, masked as its collator masks), sharded across ranks; this one
    scores raw texts one by one for any causal LM, so bits per byte compare models whose tokenizers differ.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise QuillError("heldout_loss: the tokenizer has neither a BOS nor an EOS token to start texts with")
    windows, total_bytes = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if not ids:
            continue
        total_bytes += len(text.encode("utf-8"))
        ids = [start] + ids
        windows += [ids[i : i + max_length] for i in range(0, len(ids) - 1, max_length - 1)]
    if not windows:
        raise QuillError("heldout_loss: expected some non-empty held-out texts, found none")
    windows.sort(key=len)  # similar lengths share a batch: less padding
    nats, count = 0.0, 0
    device = _device(model)
    with _inference(model):
        for batch in _batches(windows, batch_size):
            input_ids, mask = _pad(tokenizer, batch, "right", device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nats += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return {"eval_loss": nats / count, "bits_per_byte": nats / math.log(2) / total_bytes}


# -- generation and task scoring -------------------------------------------------------------------------------


def generate_completions(model, tokenizer, prompts: list, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy completions of `prompts` (chat message lists or strings), cut at the first stop token, decoded."""
    return [group[0] for group in _generate(model, tokenizer, prompts, max_new_tokens, batch_size)]


def sample_completions(
    model,
    tokenizer,
    prompts: list,
    num_samples: int,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    seed: int = 0,
) -> list[list[str]]:
    """`num_samples` sampled completions per prompt at `temperature`, from the full distribution (no top-k/top-p
    cut, as GRPO samples its rollouts), decoded like `generate_completions`. Seeded, so two calls agree."""
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    with _seeded(seed):
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, num_samples, sampling)


@contextmanager
def _seeded(seed: int):
    """Sample with a fixed seed without disturbing the caller's random stream (e.g. a trainer mid-run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, num_samples=1, sampling=None) -> list[list[str]]:
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    stops = generation_stops(model, tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    texts: list[list[str]] = [[] for _ in encoded]
    device, pad = _device(model), pad_token_id(tokenizer)
    options = sampling or {"do_sample": False}
    with _inference(model):
        for batch in _batches(order, max(1, batch_size // num_samples)):
            # Left padding: every row's prompt ends at the same column, so new tokens line up after it.
            input_ids, mask = _pad(tokenizer, [encoded[i] for i in batch], "left", device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                eos_token_id=stops,
                pad_token_id=pad,
                **options,
            )
            rows = out[:, input_ids.shape[1] :].tolist()
            for j, row in enumerate(rows):  # generate() returns each prompt's samples next to each other
                texts[batch[j // num_samples]].append(
                    tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True)
                )
    return texts


def correctness(rows: list[dict], completions: list[str]) -> list[bool]:
    """Whether each completion is fully correct (`tasks.is_correct`)."""
    from quill.data import tasks as task_lib  # here, not at the top: reasoning-gym is slow to import

    return [
        task_lib.is_correct(task_lib.score(row["task"], text, row)) for row, text in zip(rows, completions, strict=True)
    ]


def accuracy_groups(rows: list[dict]) -> dict[str, list[int]]:
    """The row groups an accuracy is reported for besides all rows: each task, and where rows carry a `slice`
    column (the default data's demonstrator slice, on/off) `on_slice` and `off_slice`. Values are row indices."""
    groups = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["task"]].append(i)
        if row.get("slice") in ("on", "off"):
            groups[f"{row['slice']}_slice"].append(i)
    return dict(sorted(groups.items()))


def accuracy_metrics(rows: list[dict], correct: list) -> dict:
    """`task_accuracy` over all rows and `<group>_accuracy` per accuracy_groups, from per-row correctness."""
    metrics = {"task_accuracy": sum(map(bool, correct)) / len(correct) if correct else float("nan")}
    for name, index in accuracy_groups(rows).items():
        metrics[f"{name}_accuracy"] = sum(bool(correct[i]) for i in index) / len(index)
    return metrics


def score_completions(rows: list[dict], completions: list[str]) -> dict:
    """Fraction fully correct (`tasks.is_correct`), overall and per task."""
    return accuracy_metrics(rows, correctness(rows, completions))


def task_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """Held-out task accuracy of a chat model. `rows`: RL/eval rows {prompt, task, answer, metadata}."""
    rows = list(rows)
    completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    return score_completions(rows, completions)


def reward_metrics(rows: list[dict], completions: list[str], reward_funcs: list | None = None) -> dict:
    """Mean total reward of `completions`, each reward function called as TRL calls it: `f(completions, **columns)`.

    Rewards of several functions are summed per completion (TRL's default, unit weights); `None` counts as 0.
    """
    from quill.data import tasks as task_lib

    if not rows:
        return {"mean_reward": float("nan")}
    funcs = reward_funcs or [task_lib.reward_fn]
    # TRL hands conversational completions to reward functions as assistant message lists.
    shaped = [c if isinstance(r["prompt"], str) else _as_messages(c) for r, c in zip(rows, completions, strict=True)]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
    totals = [0.0] * len(rows)
    metrics = {}
    for func in funcs:
        values = [
            0.0 if v is None else float(v)
            for v in func(completions=shaped, prompts=[r["prompt"] for r in rows], **columns)
        ]
        totals = [t + v for t, v in zip(totals, values, strict=True)]
        if len(funcs) > 1:
            metrics[f"reward_{getattr(func, '__name__', 'func')}"] = sum(values) / len(values)
    return {"mean_reward": sum(totals) / len(totals), **metrics}


# -- preferences -----------------------------------------------------------------------------------------------


def _reward_scores(model, tokenizer, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
    device, scores = _device(model), []
    for batch in _batches(seqs, batch_size):
        input_ids, mask = _pad(tokenizer, batch, "right", device)
        scores.append(model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().cpu())
    return torch.cat(scores)


def reward_model_scores(
    reward_model, tokenizer, prompts: list, answers: list[str], batch_size: int = 64
) -> list[float]:
    """The reward model's score of each (prompt, answer), the conversation rendered through the chat template as
    TRL's GRPOTrainer and RewardTrainer render it."""
    if reward_model.config.pad_token_id is None:  # sequence classifiers pool at the last non-pad token
        reward_model.config.pad_token_id = pad_token_id(tokenizer)
    seqs = [
        _tokenize(tokenizer, prompt + _as_messages(answer))
        if not isinstance(prompt, str)
        else _tokenize(tokenizer, prompt + answer)
        for prompt, answer in zip(prompts, answers, strict=True)
    ]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
    with _inference(reward_model):
        scores = _reward_scores(reward_model, tokenizer, [seqs[i] for i in order], batch_size).tolist()
    out = [0.0] * len(seqs)
    for i, score in zip(order, scores, strict=True):
        out[i] = score
    return out


# DPOTrainer and RewardTrainer evaluate preference pairs themselves (DPO's implicit reward against the trainer's own
# reference model or precomputed log-probs; the reward model's ranking); stages record their numbers under these names.
# Both are means of per-batch means (TRL averages each eval batch, then the batches), exact when the batch size
# divides the number of pairs.
PREFERENCE_EVAL_KEYS = {
    "DPOTrainer": {"eval_rewards/accuracies": "dpo_reward_accuracy", "eval_rewards/margins": "dpo_reward_margin"},
    "RewardTrainer": {"eval_accuracy": "preference_accuracy", "eval_margin": "reward_margin"},
}


def preference_eval(trainer) -> dict:
    """The trainer's own `evaluate()` on its eval pairs, under Quill's metric names."""
    keys = next(v for k, v in PREFERENCE_EVAL_KEYS.items() if any(c.__name__ == k for c in type(trainer).__mro__))
    metrics = trainer.evaluate()
    return {ours: metrics[theirs] for theirs, ours in keys.items()}


def preference_accuracy(model, tokenizer, pairs: list[dict], reference=None, beta: float = 0.1, batch_size=16) -> dict:
    """A saved model's preference metrics on `pairs`, computed by the trainer that trains such a model (nothing is
    trained): with `reference`, DPO's implicit-reward accuracy and margin; without, a reward model's accuracy and
    margin."""
    import tempfile

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    common = dict(per_device_eval_batch_size=batch_size, report_to=[], bf16=False, use_cpu=_device(model).type == "cpu")
    data = Dataset.from_list(pairs)  # also the train set: the trainers require one, and nothing is trained
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp32 and "no eval strategy" notices of an evaluation-only trainer
        if reference is None:
            args = RewardConfig(output_dir=tmp, **common)
            trainer = RewardTrainer(
                model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer
            )
        else:
            args = DPOConfig(output_dir=tmp, beta=beta, **common)
            trainer = DPOTrainer(
                model=model,
                ref_model=reference,
                args=args,
                train_dataset=data,
                eval_dataset=data,
                processing_class=tokenizer,
            )
        return preference_eval(trainer)
