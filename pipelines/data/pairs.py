"""Preference pairs built from a model's own answers: chosen = the answer a labeller ranks best, rejected = the
model's own answer it ranks worst.

    pairs, stats = build_pairs(model, tokenizer, rows, TaskScorer(), samples=4)

For each prompt row ({prompt, task, answer, metadata}) the candidates are the model's greedy answer, `samples`
sampled answers (distinct ones only) and, with `use_reference`, the row's reference answer. A labeller scores the
candidates of a prompt together; the pair is kept only when the labeller prefers its chosen answer. Labellers:

- TaskScorer: the task's verifiable scorer (reasoning-gym `score_answer`); chosen must be fully correct, rejected
  not: "a correct answer over the model's own wrong answer".
- RewardModelLabeller: a trained reward model's score (any sequence-classification folder or Hub id).
- JudgeLabeller: a causal LM prompted to compare two answers ("Answer A or B?"), read from its next-token
  probabilities in both orders (RLAIF: AI feedback instead of human labels); a candidate's score is its mean win
  probability against the prompt's other candidates.
"""

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

import torch

from quill.errors import QuillError
from quill.metrics import generate_completions, reward_model_scores, sample_completions

LABELLERS = ("scorer", "reward_model", "judge")


class TaskScorer:
    """Scores with each task's own verifiable scorer; a pair needs a fully correct chosen and a wrong rejected."""

    name = "scorer"

    def score_groups(self, rows: list[dict], groups: list[list[str]]) -> list[list[float]]:
        from quill.data.tasks import score

        return [[score(row["task"], answer, row) for answer in group] for row, group in zip(rows, groups, strict=True)]

    def prefers(self, chosen: float, rejected: float) -> bool:
        from quill.data.tasks import is_correct

        return is_correct(chosen) and not is_correct(rejected)


class RewardModelLabeller:
    """Scores with a reward model (higher = better); a pair needs chosen scored above rejected."""

    name = "reward_model"

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def score_groups(self, rows: list[dict], groups: list[list[str]]) -> list[list[float]]:
        prompts = [row["prompt"] for row, group in zip(rows, groups, strict=True) for _ in group]
        flat = reward_model_scores(self.model, self.tokenizer, prompts, [a for g in groups for a in g], self.batch_size)
        return _regroup(flat, groups)

    def prefers(self, chosen: float, rejected: float) -> bool:
        return chosen > rejected


JUDGE_PROMPT = (
    "Here is a question and two answers.\n\nQuestion: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Which answer is correct? Reply with A or B."
)


class JudgeLabeller:
    """A causal LM judges pairs of answers; P(A) vs P(B) at its first reply token, averaged over both orders."""

    name = "judge"

    def __init__(self, model, tokenizer, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.choices = [self._first_token(c) for c in ("A", "B")]
        if self.choices[0] == self.choices[1]:
            raise QuillError("judge: its tokenizer encodes 'A' and 'B' alike", "use another judge model")

    def _first_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise QuillError(f"judge: its tokenizer encodes {text!r} as nothing", "use another judge model")
        return ids[0]

    def _prompt_ids(self, question: str, a: str, b: str) -> list[int]:
        from quill.metrics import prompt_ids

        text = JUDGE_PROMPT.format(question=question, a=a, b=b)
        messages = [{"role": "user", "content": text}]
        return prompt_ids(self.tokenizer, messages if self.tokenizer.chat_template else text + "\nAnswer:")

    def prefer_first(self, comparisons: list[tuple[str, str, str]]) -> list[float]:
        """P(the judge prefers the first answer) for each (question, first, second), averaged over both orders."""
        from quill.metrics import _inference, _pad

        seqs = [self._prompt_ids(q, a, b) for q, a, b in comparisons] + [
            self._prompt_ids(q, b, a) for q, a, b in comparisons
        ]
        probs = []
        device = next(self.model.parameters()).device
        with _inference(self.model):
            for start in range(0, len(seqs), self.batch_size):
                ids, mask = _pad(self.tokenizer, seqs[start : start + self.batch_size], "left", device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, -1, self.choices].float()
                probs += torch.softmax(logits, -1)[:, 0].tolist()  # P(A) among {A, B}
        n = len(comparisons)
        return [(probs[i] + 1 - probs[n + i]) / 2 for i in range(n)]

    def score_groups(self, rows: list[dict], groups: list[list[str]]) -> list[list[float]]:
        comparisons, where = [], []
        for g, (row, group) in enumerate(zip(rows, groups, strict=True)):
            question = _question(row["prompt"])
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    comparisons.append((question, group[i], group[j]))
                    where.append((g, i, j))
        wins = [[0.0] * len(group) for group in groups]
        for (g, i, j), p in zip(where, self.prefer_first(comparisons), strict=True):
            wins[g][i] += p
            wins[g][j] += 1 - p
        return [[w / max(1, len(group) - 1) for w in ws] for ws, group in zip(wins, groups, strict=True)]

    def prefers(self, chosen: float, rejected: float) -> bool:
        return chosen > rejected


def _question(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m.get("role") == "user")


def _regroup(flat: list, groups: list[list]) -> list[list]:
    out, i = [], 0
    for group in groups:
        out.append(flat[i : i + len(group)])
        i += len(group)
    return out


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    greedy_correct: int = 0  # prompts whose greedy answer the task scorer accepts (what the model already knows)
    rejected_greedy: int = 0  # pairs whose rejected answer is the model's greedy answer
    chosen_own: int = 0  # pairs whose chosen answer is one of the model's own answers (not the reference)
    seconds: float = 0.0
    labeller: str = ""
    examples: list = field(default_factory=list)  # a few pairs, for the log

    def describe(self) -> str:
        return (
            f"{self.pairs} pairs from {self.prompts} prompts in {self.seconds:.0f}s, labelled by {self.labeller}; "
            f"start model greedy-correct on {self.greedy_correct / max(1, self.prompts):.1%}; rejected = its greedy "
            f"answer in {self.rejected_greedy / max(1, self.pairs):.0%}, chosen = its own answer in "
            f"{self.chosen_own / max(1, self.pairs):.0%}"
        )

    def as_metrics(self, prefix: str = "pairs") -> dict:
        return {
            f"{prefix}_prompts": self.prompts,
            f"{prefix}_built": self.pairs,
            f"{prefix}_greedy_accuracy": self.greedy_correct / max(1, self.prompts),
            f"{prefix}_rejected_greedy": self.rejected_greedy / max(1, self.pairs),
            f"{prefix}_chosen_own": self.chosen_own / max(1, self.pairs),
            f"{prefix}_seconds": round(self.seconds, 1),
        }


def build_pairs(
    model,
    tokenizer,
    rows: list[dict],
    labeller,
    samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    use_reference: bool = True,
    seed: int = 0,
) -> tuple[list[dict], PairStats]:
    """Conversational pairs {prompt, chosen, rejected, task} from `model`'s own answers to `rows` (see module doc)."""
    from quill.metrics import correctness

    started = time.time()
    prompts = [r["prompt"] for r in rows]
    greedy = generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    sampled = (
        sample_completions(model, tokenizer, prompts, samples, temperature, max_new_tokens, batch_size, seed)
        if samples
        else [[] for _ in rows]
    )
    own = [list(dict.fromkeys([g, *s])) for g, s in zip(greedy, sampled, strict=True)]  # distinct, greedy first
    groups = [
        o + [r["answer"]] if use_reference and r.get("answer") is not None and r["answer"] not in o else o
        for o, r in zip(own, rows, strict=True)
    ]
    scores = labeller.score_groups(rows, groups)
    stats = PairStats(prompts=len(rows), labeller=labeller.name)
    stats.greedy_correct = sum(correctness(rows, greedy)) if all("answer" in r for r in rows) else 0
    pairs = []
    for row, group, score, mine in zip(rows, groups, scores, own, strict=True):
        best = max(range(len(group)), key=lambda i: (score[i], i < len(mine)))  # ties: the model's own answer
        worst = min(range(len(mine)), key=lambda i: (score[i], i))  # ties: the greedy answer
        if best == worst or not labeller.prefers(score[best], score[worst]):
            continue
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": group[best]}],
                "rejected": [{"role": "assistant", "content": mine[worst]}],
                "task": row["task"],
            }
        )
        stats.rejected_greedy += worst == 0
        stats.chosen_own += best < len(mine)
    stats.pairs, stats.seconds = len(pairs), time.time() - started
    stats.examples = pairs[:3]
    return pairs, stats


def make_labeller(kind: str, model_path: str | None, trust_remote_code: bool = False, model_args=None):
    """The labeller a stage config names: 'scorer' (no model), 'reward_model' or 'judge' (a folder or Hub id), its
    model on the training device in the dtype and attention backend of `model_args` (the stage's; None: float32)."""
    if kind not in LABELLERS:
        raise QuillError(f"pair_labeller must be one of {', '.join(LABELLERS)}, found {kind!r}", "pick one of them")
    if kind == "scorer":
        return TaskScorer()
    if not model_path:
        raise QuillError(f"pair_labeller {kind} needs labeller_model", "set labeller_model to a model folder or Hub id")
    from quill.loading import CAUSAL_LM, CLASSIFIER, check_model_path, load_for_inference, load_tokenizer

    check_model_path(model_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    task = CLASSIFIER if kind == "reward_model" else CAUSAL_LM
    if model_args is None:
        model_args = SimpleNamespace(model_name_or_path=None, trust_remote_code=trust_remote_code)
    model = load_for_inference(model_path, model_args, "reward" if kind == "reward_model" else "judge", tokenizer, task)
    return RewardModelLabeller(model, tokenizer) if kind == "reward_model" else JudgeLabeller(model, tokenizer)


@dataclass
class PolicyPairArguments:
    """How a stage builds preference pairs from its start model's own answers (DPO, reward model)."""

    pairs_from: Literal["auto", "dataset", "policy"] = field(
        default="auto",
        metadata={
            "help": "'dataset': train on the dataset's chosen/rejected pairs. 'policy': build pairs at stage start "
            "from the start model's own answers to the dataset's prompts (rows {prompt, task, answer, metadata}). "
            "'auto': 'dataset' when the data has chosen and rejected columns, else 'policy' (the log says which)."
        },
    )
    pair_labeller: Literal["scorer", "reward_model", "judge"] = field(
        default="scorer",
        metadata={
            "help": "Who labels policy pairs: the task's verifiable 'scorer', a 'reward_model', or a 'judge' causal LM "
            "asked which of two answers is correct (labeller_model names the last two)."
        },
    )
    labeller_model: str | None = field(
        default=None, metadata={"help": "Reward-model or judge folder or Hub id, for pair_labeller other than scorer."}
    )
    pair_samples: int = field(
        default=4, metadata={"help": "Sampled answers per prompt, besides the greedy one, as pair candidates."}
    )
    pair_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the pair candidates."})
    pair_max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per pair candidate."})
    pair_use_reference: bool = field(
        default=True, metadata={"help": "Also offer the row's reference answer as a candidate for chosen."}
    )

    def check_pairs(self):
        """Options that need each other (value ranges are quill.arguments.RANGE_RULES)."""
        if self.pairs_from != "dataset" and self.pair_labeller != "scorer" and not self.labeller_model:
            raise ValueError(f"pair_labeller {self.pair_labeller} needs labeller_model (a model folder or Hub id)")
        if self.labeller_model and self.pair_labeller == "scorer":
            raise ValueError("labeller_model is set but pair_labeller is scorer, which uses no model")


def policy_pairs(
    stage_name: str,
    model,
    tokenizer,
    splits: dict,
    args: PolicyPairArguments,
    trust_remote_code: bool = False,
    model_args=None,
) -> tuple[list, list, PairStats]:
    """Train and held-out pairs from `model`'s answers to a stage's prompt splits, and the train build's stats.
    `model_args` (the stage's) give the labeller model its dtype and attention backend."""
    columns = splits["train"].column_names
    if args.pair_labeller == "scorer" and not {"task", "answer"} <= set(columns):
        raise QuillError(
            f"{stage_name}: pairs_from: policy with pair_labeller: scorer needs prompt rows with task and answer "
            f"columns (as quill:default/rl_train has), found columns {columns}",
            "use such prompts, or pairs_from: dataset for chosen/rejected data",
        )
    labeller = make_labeller(args.pair_labeller, args.labeller_model, trust_remote_code, model_args)
    built = {}
    for name in ("train", "eval"):
        built[name] = build_pairs(
            model,
            tokenizer,
            list(splits[name]),
            labeller,
            samples=args.pair_samples,
            temperature=args.pair_temperature,
            max_new_tokens=args.pair_max_new_tokens,
            use_reference=args.pair_use_reference,
            seed=args.seed,
        )
    pairs, stats = built["train"]
    if not pairs:
        raise QuillError(
            f"{stage_name}: the labeller preferred no candidate over the model's own answers on any of "
            f"{stats.prompts} prompts, so there are no pairs to train on",
            "use more prompts or pair_samples, or another pair_labeller",
        )
    return pairs, built["eval"][0], stats
