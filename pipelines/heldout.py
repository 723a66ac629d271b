"""Held-out evaluation of a policy stage: greedy accuracy per prompt and per task, sampled pass@1 / pass@k, and the
paired comparison of the trained model against the model it started from (or against a control).

A stage's `evaluate()` returns `evaluate_policy(...)`: scalar metrics plus the per-prompt greedy correctness under
CORRECT (a private key: kept for the comparison, never saved). `run_stage(..., compare=compare_to_start(rows))`
then adds the paired difference of every accuracy, its 95% interval and exact McNemar p (quill.stats).
"""

from dataclasses import dataclass, field

from quill.metrics import accuracy_groups, accuracy_metrics, correctness, generate_completions, sample_completions
from quill.stats import paired_difference, pass_at_k, verdict

CORRECT = "_task_correct"  # per-prompt greedy correctness (0/1), in prompt order
SAMPLES = "_samples"  # per-prompt sampled completions, for callers that score them further (never saved)
MIN_HEADROOM = 0.05  # below this pass@k - greedy gap, RL has too little to select from to show a gain


@dataclass
class EvalArguments:
    """How a policy stage scores its held-out prompts (`task_eval`) before and after training."""

    eval_max_new_tokens: int = field(
        default=32, metadata={"help": "Tokens generated per held-out answer, greedy and sampled (answers end sooner)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Sequences generated at once in held-out evaluation."})
    eval_samples: int = field(
        default=0,
        metadata={"help": "Sampled answers per held-out prompt for sampled pass@1 and pass@k (0: greedy only)."},
    )
    eval_sample_prompts: int | None = field(
        default=None, metadata={"help": "Sample answers for only the first this many held-out prompts (all: null)."}
    )

    def evaluate(self, model, tokenizer, rows: list[dict], temperature: float = 1.0, seed: int = 0) -> dict:
        return evaluate_policy(
            model,
            tokenizer,
            rows,
            self.eval_max_new_tokens,
            self.eval_batch_size,
            self.eval_samples,
            self.eval_sample_prompts,
            temperature,
            seed,
        )


def evaluate_policy(
    model,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    samples: int = 0,
    sample_prompts: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict:
    """Greedy accuracy on `rows` (overall, per task, per prompt under CORRECT).

    With `samples` > 0, also `samples` completions at `temperature` for the first `sample_prompts` rows:
    `sampled_accuracy` (pass@1 at that temperature), `pass_at_<samples>` and `headroom` (pass@k minus greedy
    accuracy on the same prompts): what RL can turn into greedy gains.
    """
    completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    correct = correctness(rows, completions)
    metrics = {**accuracy_metrics(rows, correct), CORRECT: [int(c) for c in correct]}
    if samples:
        metrics.update(sampled_metrics(model, tokenizer, rows[:sample_prompts], correct, samples, temperature,
                                       max_new_tokens, batch_size, seed))  # fmt: skip
    return metrics


def sampled_metrics(model, tokenizer, rows, greedy_correct, samples, temperature, max_new_tokens, batch_size, seed):
    groups = sample_completions(
        model, tokenizer, [r["prompt"] for r in rows], samples, temperature, max_new_tokens, batch_size, seed
    )
    hits = [correctness([row] * samples, group) for row, group in zip(rows, groups, strict=True)]
    greedy = sum(greedy_correct[: len(rows)]) / len(rows)
    pass_k = sum(pass_at_k(samples, sum(h), samples) for h in hits) / len(rows)
    return {
        "sampled_accuracy": sum(sum(h) for h in hits) / (samples * len(rows)),
        f"pass_at_{samples}": pass_k,
        "headroom": pass_k - greedy,
        "sampled_prompts": len(rows),
        "sampled_temperature": temperature,
        SAMPLES: groups,
        "_sample_correct": hits,
    }


def headroom_warning(metrics: dict) -> str | None:
    """A sentence for the log and the report when pass@k - greedy is too small for RL to show a greedy gain."""
    headroom = metrics.get("headroom")
    if headroom is None or headroom >= MIN_HEADROOM:
        return None
    k = next((key.removeprefix("pass_at_") for key in metrics if key.startswith("pass_at_")), "k")
    return (
        f"headroom pass@{k} - greedy = {headroom:.3f} on held-out prompts is below {MIN_HEADROOM}: RL can only "
        "select among answers sampling already finds, so a greedy gain is unlikely to show"
    )


def paired_metrics(rows: list[dict], base: list, new: list, prefix: str = "") -> dict:
    """Paired differences (new - base) of `task_accuracy` and each `<group>_accuracy` (a task, on_slice, off_slice),
    keys `<prefix><metric>_diff`, `_diff_low`, `_diff_high`, `_p`, `_n`, `_gained`, `_lost`, `_from`, `_to`
    (quill.stats.PairedDifference)."""
    out = paired_difference(base, new).as_metrics(f"{prefix}task_accuracy")
    for name, index in accuracy_groups(rows).items():
        result = paired_difference([base[i] for i in index], [new[i] for i in index])
        out.update(result.as_metrics(f"{prefix}{name}_accuracy"))
    return out


def compare_to_start(rows: list[dict]):
    """The `compare` hook of run_stage: the trained model against the start model on the same held-out prompts."""

    def compare(before: dict, after: dict) -> dict:
        base, new = before.get(CORRECT + "_before"), after.get(CORRECT)
        if base is None or new is None or len(base) != len(new):
            return {}
        return paired_metrics(rows, base, new)

    return compare


def describe(metrics: dict, prefix: str = "task_accuracy") -> str:
    """One line for the log: 'task_accuracy 0.310 -> 0.372 (+0.062, 95% CI +0.041..+0.083, p=3.1e-07, gain)'."""
    if f"{prefix}_diff" not in metrics:
        return ""
    d, lo, hi, p = (metrics[f"{prefix}{s}"] for s in ("_diff", "_diff_low", "_diff_high", "_p"))
    return (
        f"{prefix} {metrics[f'{prefix}_from']:.3f} -> {metrics[f'{prefix}_to']:.3f} "
        f"({d:+.3f}, 95% CI {lo:+.3f}..{hi:+.3f}, p={p:.3g}, {verdict(p, lo, hi)})"
    )
