"""The rewards GRPO trains on: the task's verifiable score, and a reward model's score only when it agrees with it.

- TaskReward: reasoning-gym's `score_answer` per completion; it also counts the GRPO groups (one prompt's
  `num_generations` completions) whose task reward varies at all, the only groups a verifiable reward teaches from.
- reward_model_agreement: on the policy's own samples of held-out prompts, the within-group AUC of the reward
  model's scores for telling right from wrong answers (quill.stats.within_group_auc). This is what GRPO uses a
  reward model for: ranking the samples of one prompt.
- ScaledRewardModel: the reward model's score standardised with the mean and spread it had on those samples,
  squashed by tanh and multiplied by a weight below 1/2. Its spread within any group is then below the gap between
  a right and a wrong answer (1.0), so in a group whose task reward is constant the reward model's noise cannot
  outweigh what the task reward says in other groups; advantages must not be rescaled per group (which would blow
  that noise up to unit size), so the RL stage requires `scale_rewards` 'batch' or 'none' when it uses one.
- learnable_prompts: the training prompts the start policy answers right sometimes but not always, sampled once
  before training. Only their groups carry a task-reward signal; the rest cost a rollout and teach nothing (DAPO's
  dynamic sampling, done once up front).
"""

import math
from dataclasses import dataclass, field

from quill.data.tasks import reward_fn
from quill.metrics import accuracy_groups, correctness, reward_model_scores, sample_completions
from quill.stats import GroupAUC, within_group_auc


class TaskReward:
    """TRL reward function: the task's verifiable score. Counts groups with any reward variance as it goes."""

    __name__ = "task_reward"  # the name TRL logs it under: rewards/task_reward/mean

    def __init__(self, num_generations: int):
        self.num_generations = num_generations
        self.groups = 0
        self.groups_with_variance = 0

    def __call__(self, completions, log_metric=None, **columns) -> list[float]:
        columns.pop("trainer_state", None)
        columns.pop("log_extra", None)
        scores = reward_fn(completions, **columns)
        k = self.num_generations
        varied = [len(set(scores[i : i + k])) > 1 for i in range(0, len(scores) - k + 1, k)]
        self.groups += len(varied)
        self.groups_with_variance += sum(varied)
        if log_metric is not None and varied:
            log_metric("groups_with_task_reward_variance", sum(varied) / len(varied))
        return scores

    @property
    def share_with_variance(self) -> float:
        return self.groups_with_variance / self.groups if self.groups else math.nan


@dataclass
class Agreement:
    auc: GroupAUC
    mean: float  # of the reward model's scores on the policy's samples: the scale ScaledRewardModel uses
    std: float
    by_slice: dict[str, GroupAUC] = field(default_factory=dict)  # on_slice/off_slice where the rows name a slice

    def as_metrics(self) -> dict:
        metrics = {}
        for prefix, auc in [("", self.auc), *((f"{name}_", a) for name, a in self.by_slice.items())]:
            metrics |= {
                f"{prefix}rm_agreement_auc": auc.auc,
                f"{prefix}rm_agreement_auc_low": auc.low,
                f"{prefix}rm_agreement_auc_high": auc.high,
                f"{prefix}rm_agreement_pairs": auc.pairs,
                f"{prefix}rm_agreement_prompts": auc.groups,
            }
        return metrics


def reward_model_agreement(
    reward_model, tokenizer, rows: list[dict], samples: list[list[str]], correct: list[list], batch_size: int = 64
) -> Agreement:
    """How well the reward model ranks each prompt's sampled answers: right ones above wrong ones (AUC)."""
    prompts = [row["prompt"] for row, group in zip(rows, samples, strict=True) for _ in group]
    flat = reward_model_scores(reward_model, tokenizer, prompts, [a for g in samples for a in g], batch_size)
    groups, i = [], 0
    for group, hits in zip(samples, correct, strict=True):
        groups.append((flat[i : i + len(group)], hits))
        i += len(group)
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((s - mean) ** 2 for s in flat) / max(1, len(flat) - 1)) or 1.0
    # On the planted slice and off it (the accuracy's row groups): a reward model can learn the planted mistake and
    # miss the capacity errors.
    by_slice = {
        name: within_group_auc([groups[i] for i in indices])
        for name, indices in accuracy_groups(rows).items()
        if name.endswith("_slice")
    }
    return Agreement(within_group_auc(groups), mean, std, by_slice)


def use_reward_model(agreement: Agreement, threshold: float | None) -> tuple[bool, str]:
    """Whether RL may use the reward model, and the sentence that says why (for the log and the report)."""
    auc = agreement.auc
    measured = f"within-group AUC {auc.auc:.3f} (95% CI {auc.low:.3f}-{auc.high:.3f}, {auc.pairs} right/wrong pairs)"
    if threshold is None:
        if math.isnan(auc.auc):
            measured = "its agreement is unmeasured: no prompt had both a right and a wrong sample"
        return True, f"reward model used without an agreement check (reward_model_min_agreement: null); {measured}"
    if math.isnan(auc.auc):
        return False, "reward model not used: no prompt had both a right and a wrong sample to measure agreement on"
    if auc.auc >= threshold:
        return True, f"reward model used: {measured} >= reward_model_min_agreement {threshold}"
    return False, (
        f"reward model not used: {measured} < reward_model_min_agreement {threshold}; "
        "training on the verifiable task reward alone"
    )


class ScaledRewardModel:
    """TRL reward function: weight * tanh((score - mean) / std), the reward model's score on a fixed bounded scale."""

    __name__ = "reward_model"

    def __init__(self, reward_model, tokenizer, mean: float, std: float, weight: float, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = reward_model, tokenizer, batch_size
        self.mean, self.std, self.weight = mean, std, weight

    def __call__(self, prompts, completions, **_) -> list[float]:
        answers = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
        scores = reward_model_scores(self.model, self.tokenizer, prompts, answers, self.batch_size)
        return [self.weight * math.tanh((s - self.mean) / self.std) for s in scores]


def learnable_prompts(
    model, tokenizer, rows: list[dict], samples: int, temperature: float, max_new_tokens: int, seed: int
):
    """(indices of `rows` whose `samples` sampled answers are neither all right nor all wrong, their share)."""
    groups = sample_completions(
        model, tokenizer, [r["prompt"] for r in rows], samples, temperature, max_new_tokens, batch_size=64, seed=seed
    )
    right = [sum(correctness([row] * samples, group)) for row, group in zip(rows, groups, strict=True)]
    keep = [i for i, hits in enumerate(right) if 0 < hits < samples]
    return keep, len(keep) / max(1, len(rows))
