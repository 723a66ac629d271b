"""Statistics for comparing two models on the same held-out prompts: paired differences, their intervals, exact tests.

    paired_difference(before_correct, after_correct)  ->  PairedDifference(diff, low, high, p_value, ...)

A stage's start model and its trained model answer the same prompts, so their accuracies are compared per prompt:
only the prompts whose correctness changed (`gained`: wrong -> right, `lost`: right -> wrong) carry information.

- p-value: the exact McNemar test, i.e. a two-sided binomial test of `gained` against `lost` with p = 1/2.
- interval: Newcombe's hybrid score interval for a difference of paired proportions (Newcombe 1998, Stat Med 17,
  2635-2650, method 10): Wilson intervals of both accuracies, combined with their estimated correlation. It stays
  inside [-1, 1] and keeps near-nominal coverage where the Wald interval does not (few changed answers).

Also here: the unbiased pass@k estimator and the within-group AUC that measures whether a reward model ranks a
policy's correct samples above its wrong ones. Pure Python: no scipy needed.
"""

import math
import random
from dataclasses import asdict, dataclass
from fractions import Fraction
from statistics import NormalDist

SIGNIFICANCE = 0.05  # the level at which a report calls a change significant


def z_value(confidence: float) -> float:
    """The two-sided normal quantile: 1.96 for 0.95."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), found {confidence}")
    return NormalDist().inv_cdf((1 + confidence) / 2)


def verdict(p_value: float, low: float, high: float) -> str:
    """'gain' or 'loss' only when the exact test rejects "no change" AND the interval excludes 0."""
    if p_value < SIGNIFICANCE and low > 0:
        return "gain"
    if p_value < SIGNIFICANCE and high < 0:
        return "loss"
    return "no significant change"


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n."""
    if n <= 0:
        return 0.0, 1.0
    z, p = z_value(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 or n successes the bound equals p exactly, but rounding can leave it a hair on the wrong side of p
    # (wilson_interval(0, 17)[0] was 1.4e-17): keep the interval around its estimate.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def exact_mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: P(a Binomial(gained + lost, 1/2) count is at least as lopsided)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


@dataclass
class PairedDifference:
    """Accuracy after minus accuracy before on the same n prompts, with a 95% interval and the exact McNemar p."""

    n: int
    before: float
    after: float
    diff: float
    low: float
    high: float
    p_value: float
    gained: int  # wrong before, right after
    lost: int  # right before, wrong after

    @property
    def verdict(self) -> str:
        return verdict(self.p_value, self.low, self.high)

    def as_metrics(self, prefix: str) -> dict:
        """Flat metric keys: `<prefix>_from` / `_to` (the two accuracies), `_diff`, `_diff_low`, `_diff_high`, `_p`,
        `_gained`, `_lost`, `_n`."""
        values = asdict(self)
        return {
            f"{prefix}_from": values["before"],
            f"{prefix}_to": values["after"],
            f"{prefix}_diff": values["diff"],
            f"{prefix}_diff_low": values["low"],
            f"{prefix}_diff_high": values["high"],
            f"{prefix}_p": values["p_value"],
            f"{prefix}_gained": values["gained"],
            f"{prefix}_lost": values["lost"],
            f"{prefix}_n": values["n"],
        }


def paired_difference(before: list, after: list, confidence: float = 0.95) -> PairedDifference:
    """Compare per-prompt correctness (truthy = right) of two models on the same prompts, in the same order."""
    if len(before) != len(after):
        raise ValueError(f"paired results need the same prompts: {len(before)} before, {len(after)} after")
    n = len(before)
    both = sum(1 for b, a in zip(before, after, strict=True) if b and a)
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    neither = n - both - gained - lost
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, math.nan, 1.0, 0, 0)
    p_after, p_before = (both + gained) / n, (both + lost) / n
    l_after, u_after = wilson_interval(both + gained, n, confidence)
    l_before, u_before = wilson_interval(both + lost, n, confidence)
    # Correlation of the two accuracies, with Newcombe's continuity correction of the cross product.
    margins = (both + gained) * (lost + neither) * (both + lost) * (gained + neither)
    cross = both * neither - gained * lost
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > n / 2 else cross) / math.sqrt(margins)
    diff = p_after - p_before
    down = math.sqrt(
        max(0.0, (p_after - l_after) ** 2 + (u_before - p_before) ** 2)
        - 2 * phi * (p_after - l_after) * (u_before - p_before)
    )
    up = math.sqrt(
        max(0.0, (u_after - p_after) ** 2 + (p_before - l_before) ** 2)
        - 2 * phi * (u_after - p_after) * (p_before - l_before)
    )
    return PairedDifference(
        n=n,
        before=p_before,
        after=p_after,
        diff=diff,
        low=max(-1.0, diff - down),
        high=min(1.0, diff + up),
        p_value=exact_mcnemar_p(gained, lost),
        gained=gained,
        lost=lost,
    )


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is right) from n samples with `correct` right ones."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, found {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


@dataclass
class GroupAUC:
    auc: float  # P(score of a right sample > score of a wrong sample of the same prompt), ties count one half
    low: float  # 95% bootstrap interval over prompts
    high: float
    pairs: int  # (right, wrong) sample pairs compared
    groups: int  # prompts with at least one right and one wrong sample


def within_group_auc(groups: list[tuple[list[float], list]], boot: int = 400, seed: int = 0) -> GroupAUC:
    """AUC of `scores` for telling right from wrong samples, counted only within a prompt's own samples.

    `groups`: one (scores, correct) per prompt. Comparing within prompts removes what a reward model learns about
    prompts (some are easier), leaving what RL uses: the ranking of one prompt's samples.
    """
    per_group = []  # (wins, pairs) per informative prompt
    for scores, correct in groups:
        right = [s for s, c in zip(scores, correct, strict=True) if c]
        wrong = [s for s, c in zip(scores, correct, strict=True) if not c]
        if right and wrong:
            wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
            per_group.append((wins, len(right) * len(wrong)))
    if not per_group:
        return GroupAUC(math.nan, math.nan, math.nan, 0, 0)
    pairs = sum(p for _, p in per_group)
    auc = sum(w for w, _ in per_group) / pairs
    rng, estimates = random.Random(seed), []
    for _ in range(boot):  # resample prompts: the samples of one prompt are not independent of each other
        draw = [per_group[rng.randrange(len(per_group))] for _ in per_group]
        estimates.append(sum(w for w, _ in draw) / sum(p for _, p in draw))
    estimates.sort()
    low, high = estimates[int(0.025 * boot)], estimates[min(boot - 1, int(0.975 * boot))]
    return GroupAUC(auc, low, high, pairs, len(per_group))
