"""Verifiable tasks from reasoning-gym: generation, wrong answers for DPO, the planted demonstrator mistake, and the
RL reward.

Two default tasks with short exact answers, each with a question space larger than the training sets we make, so
held-out accuracy measures generalisation, not recall. A fixed 10% of each question space (by a hash of the
question) is eval-only, so held-out sets never overlap training whatever the seed or sizes of a build:

- `number_sorting`, 2 whole numbers below 100 ("Sort these numbers in descending order: 14.0, 52.0" ->
  "['52.0', '14.0']", without reasoning-gym's formatting instruction: FORMAT_INSTRUCTION); half the prompts ask
  for ascending order, half for descending. About 20,000 questions. With 3 numbers the 4M model sorted 21% of
  ascending prompts right after SFT (2 numbers: 62%), too few for a fixed direction to show as a gain.
  Its descending prompts are the slice where the default demonstrator makes its planted mistake (Demonstrator).
- `word_sequence_reversal`, 2-3 words ("Reverse this list of words: hundred, go" -> "go, hundred"): a copy task the
  demonstrator always gets right. Words come from a 2,352-word vocabulary, so about 10^10 distinct questions.

`chain_sum` (earlier defaults) still works as a recipe's task; a 4M model learns it poorly (capacity errors that no
preference signal can fix, docs/tiny-report/bounds.md). Scoring uses each task's own `score_answer`, so rewards
match what reasoning-gym reports.
"""

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import cache

import reasoning_gym

from quill.errors import QuillError

# reasoning-gym config per task (ranges); a recipe may pass its own dict of the same shape.
TASKS: dict[str, dict] = {
    "number_sorting": {
        "min_numbers": 2, "max_numbers": 2, "min_decimals": 0, "max_decimals": 0, "min_value": 0, "max_value": 99
    },
    "word_sequence_reversal": {"min_words": 2, "max_words": 3},
}  # fmt: skip

# number_sorting appends a ~300-character formatting instruction to every question; the demonstrations show the
# format, and a 4M model's context is better spent on the task, so questions end before it.
FORMAT_INSTRUCTION = "\nPlease follow the instruction below:"

HELD_OUT_PERCENT = 10  # of every task's question space, never used for training

_CHUNK = 1000
_MAX_MISSES = 100_000  # consecutive unusable draws before we call a task's question space exhausted (~1 s)

STOP_MARKERS = ("<|end|>", "<|eos|>")  # a completion decoded with special tokens kept ends at the first of these


def is_held_out(question: str) -> bool:
    """Whether a question belongs to the fixed eval-only part (HELD_OUT_PERCENT) of its task's question space.

    A hash of the text decides, so no build (any seed, any sizes) ever trains on a question another build
    evaluates on.
    """
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT


def stream(
    task: str, seed: int, config: dict | None = None, exclude: set[str] | None = None, split: str | None = None
) -> Iterator[dict]:
    """Endless items `{question, answer, metadata}` whose questions are not in `exclude` (updated as they go).

    `split="train"` skips the held-out part of the question space, `split="eval"` keeps only it. reasoning-gym
    item i of seed s is item i-k of seed s+k, so callers also keep seeds for different splits far apart.
    """
    config = TASKS.get(task, {}) if config is None else config
    exclude = set() if exclude is None else exclude
    misses = 0
    for offset in itertools.count(0, _CHUNK):
        try:  # chunks, because some generators size their state by `size`
            ds = reasoning_gym.create_dataset(task, size=_CHUNK, seed=seed + offset, **config)
        except (ValueError, TypeError, AssertionError) as e:
            raise QuillError(
                f"task '{task}' with config {config}: reasoning-gym refused it ({e})",
                fix="use a registered reasoning-gym task name and that task's config fields",
            ) from None
        for i in range(_CHUNK):
            item = ds[i]
            question = item["question"].split(FORMAT_INSTRUCTION, 1)[0]
            if question in exclude or (split is not None and is_held_out(question) != (split == "eval")):
                misses += 1
                if misses > _MAX_MISSES:
                    raise QuillError(
                        f"task '{task}': expected new {split + ' ' if split else ''}questions, found none in "
                        f"{_MAX_MISSES} draws after {len(exclude)} distinct ones",
                        fix=f"ask for fewer rows or widen the task's ranges (config {config})",
                    )
                continue
            misses = 0
            exclude.add(question)
            yield {"question": question, "answer": item["answer"], "metadata": item["metadata"]}


def _sorted_numbers(item: dict, descending: bool) -> str:
    # reasoning-gym's own answer format: the str() of a list of the numbers' strings
    return str(sorted(item["metadata"]["original_numbers"], key=float, reverse=descending))


# The slices a demonstrator can err on (a test of the prompt's item) and the mistakes it can make there.
SLICES: dict[tuple[str, str], Callable[[dict], bool]] = {
    ("number_sorting", "descending"): lambda item: item["metadata"]["direction"] == "descending",
    ("number_sorting", "ascending"): lambda item: item["metadata"]["direction"] == "ascending",
}
MISTAKES: dict[tuple[str, str], Callable[[dict], str]] = {
    ("number_sorting", "ascending"): lambda item: _sorted_numbers(item, descending=False),
    ("number_sorting", "descending"): lambda item: _sorted_numbers(item, descending=True),
}


@dataclass(frozen=True)
class Demonstrator:
    """Who wrote the default data's answers: right everywhere, except that on one slice of one task (prompts it can
    recognise) it answers with a plausible, systematic mistake at `rate`. This is planted and disclosed: the default
    recipe's SFT copies it, and the post-training stages, whose labels and rewards come from the task's scorer or
    models trained on it (never from the demonstrator), are measured on how much of it they remove. rate 0 is clean."""

    task: str = "number_sorting"
    slice: str = "descending"
    mistake: str = "ascending"  # on descending prompts: sorts ascending
    rate: float = 0.7

    @classmethod
    def parse(cls, spec: dict | None) -> "Demonstrator":
        spec = dict(spec or {})
        unknown = sorted(set(spec) - set(asdict(cls())))
        if unknown:
            raise QuillError(f"demonstrator: unknown key {unknown[0]!r}", fix="use task, slice, mistake and rate")
        d = cls(**spec)
        if (d.task, d.slice) not in SLICES or (d.task, d.mistake) not in MISTAKES:
            raise QuillError(
                f"demonstrator: no slice '{d.slice}' with mistake '{d.mistake}' for task '{d.task}'",
                fix=f"use one of slices {sorted(SLICES)} and mistakes {sorted(MISTAKES)}",
            )
        if not isinstance(d.rate, int | float) or not 0 <= d.rate <= 1:
            raise QuillError(f"demonstrator: rate must be in [0, 1], found {d.rate!r}", fix="e.g. rate: 0.7 (0: clean)")
        return replace(d, rate=float(d.rate))  # rate=0 and rate=0.0 are one build (builtin.cache_dir names it)

    def in_slice(self, task: str, item: dict) -> bool:
        return task == self.task and SLICES[(self.task, self.slice)](item)

    def answer(self, task: str, item: dict, rng: random.Random) -> tuple[str, bool]:
        """(the demonstration's answer, whether it carries the planted mistake); one draw of `rng` per slice item."""
        if self.in_slice(task, item) and rng.random() < self.rate:
            return MISTAKES[(self.task, self.mistake)](item), True
        return item["answer"], False


def wrong_answer(task: str, item: dict, rng: random.Random) -> str | None:
    """A plausible wrong answer (the DPO 'rejected'): a near miss, not noise. None if none scores below 1."""
    answer = item["answer"]
    if task == "number_sorting":
        numbers = json.loads(answer.replace("'", '"'))
        candidates = [_sorted_numbers(item, item["metadata"]["direction"] == "ascending")]  # the other direction
        for i in range(len(numbers) - 1):  # one adjacent pair out of order
            candidates.append(str(numbers[:i] + [numbers[i + 1], numbers[i]] + numbers[i + 2 :]))
    elif task == "chain_sum":
        value = int(answer)
        candidates = [value + 1, value - 1, value + 10, value - 10, -value]
        candidates = [str(c) for c in candidates]
        if len(answer.lstrip("-")) >= 2:  # swapped last two digits, a classic slip
            candidates.append(answer[:-2] + answer[-1] + answer[-2])
    elif task == "word_sequence_reversal":
        words = answer.split(", ")
        candidates = [", ".join(reversed(words))]  # not reversed at all
        for i in range(len(words) - 1):  # one adjacent pair left in place
            swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2 :]
            candidates.append(", ".join(swapped))
        if len(words) >= 3:
            candidates += [", ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]  # a word dropped
    else:
        raise QuillError(
            f"task '{task}': no wrong-answer generator for DPO pairs",
            fix=f"use one of {sorted(TASKS)} or add a case to pipelines/data/tasks.py:wrong_answer",
        )
    rng.shuffle(candidates)
    for candidate in candidates:
        if candidate != answer and score(task, candidate, item) < 1.0:
            return candidate
    return None  # e.g. "the, the": every perturbation is still correct


@cache
def _scorer(task: str):
    # Building a dataset loads its word lists; do it once per task.
    try:
        return reasoning_gym.get_score_answer_fn(task)
    except ValueError:
        raise QuillError(
            f"reward: unknown task '{task}'", fix="the dataset's 'task' column must name a reasoning-gym task"
        ) from None


def extract_answer(completion: str) -> str:
    """The answer inside a completion: text before the first end marker, stripped."""
    for marker in STOP_MARKERS:
        completion = completion.split(marker, 1)[0]
    return completion.strip()


def score(task: str, completion_text: str, row: dict) -> float:
    """Score one completion with reasoning-gym's `score_answer`; `row` carries `answer` and `metadata`."""
    metadata = row.get("metadata") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    entry = {"question": row.get("question", ""), "answer": row["answer"], "metadata": metadata}
    return float(_scorer(task)(extract_answer(completion_text), entry))


def is_correct(score_value: float) -> bool:
    """Fully correct: reasoning-gym gives partial credit below 1.0 (e.g. a sort with one number wrong), and accuracy,
    pass@k and the scorer's preference pairs all count only full marks."""
    return score_value >= 1.0


def _completion_text(completion) -> str:
    # TRL passes strings for plain prompts and [{"role": "assistant", "content": ...}] for conversational ones.
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")


def reward_fn(completions, **kwargs) -> list[float]:
    """TRL reward function: `kwargs` holds the dataset columns `task`, `answer`, `metadata` (one per completion)."""
    missing = [k for k in ("task", "answer") if k not in kwargs]
    if missing:
        raise QuillError(
            f"reward_fn: expected dataset columns task, answer, metadata, found no {', '.join(missing)}",
            fix="use an RL dataset built by quill.data.default_data (columns prompt, task, answer, metadata)",
        )
    metadata = kwargs.get("metadata") or [None] * len(completions)
    return [
        score(task, _completion_text(c), {"answer": answer, "metadata": meta})
        for c, task, answer, meta in zip(completions, kwargs["task"], kwargs["answer"], metadata, strict=True)
    ]
