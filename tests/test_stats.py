"""quill.stats: known inputs give the published intervals and exact p-values; planted scores give their AUC."""

import math

import pytest

from quill.heldout import headroom_warning, paired_metrics
from quill.stats import exact_mcnemar_p, paired_difference, pass_at_k, verdict, wilson_interval, within_group_auc


def paired(both: int, lost: int, gained: int, neither: int) -> tuple[list[int], list[int]]:
    """Per-prompt correctness before and after with the given cell counts."""
    before = [1] * both + [1] * lost + [0] * gained + [0] * neither
    after = [1] * both + [0] * lost + [1] * gained + [0] * neither
    return before, after


def test_exact_mcnemar_is_the_two_sided_binomial_tail():
    assert exact_mcnemar_p(9, 1) == pytest.approx(22 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10
    assert exact_mcnemar_p(1, 9) == exact_mcnemar_p(9, 1)
    assert exact_mcnemar_p(16, 6) == pytest.approx(2 * 110056 / 2**22)  # 0.0525: Fagerland et al., Cavo data
    assert exact_mcnemar_p(0, 0) == 1.0 and exact_mcnemar_p(3, 3) == 1.0
    assert exact_mcnemar_p(30, 0) == pytest.approx(2 / 2**30)
    assert exact_mcnemar_p(600, 500) < 0.01 and exact_mcnemar_p(600, 560) > 0.2  # large n stays exact and finite


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)


def test_paired_interval_matches_newcombe_method_10():
    # Cavo et al. (2012), complete response before/after consolidation: 59 both, 6 lost, 16 gained, 80 neither.
    # contingencytables (Fagerland, Lydersen & Laake) gives -0.0621 (95% CI -0.1186 to -0.0046) for before - after.
    result = paired_difference(*paired(59, 6, 16, 80))
    assert (result.n, result.gained, result.lost) == (161, 16, 6)
    assert result.diff == pytest.approx(10 / 161)
    assert result.low == pytest.approx(0.0046, abs=1e-4) and result.high == pytest.approx(0.1186, abs=1e-4)
    assert result.p_value == pytest.approx(0.05248, abs=1e-5)
    # The interval excludes 0 but the exact test does not reject: not called a gain.
    assert result.verdict == "no significant change"


def test_verdicts_need_the_test_and_the_interval():
    gain = paired_difference(*paired(500, 10, 60, 430))
    assert gain.p_value < 1e-6 and gain.low > 0 and gain.verdict == "gain"
    loss = paired_difference(*paired(500, 60, 10, 430))
    assert loss.verdict == "loss" and loss.high < 0
    noise = paired_difference(*paired(500, 20, 25, 455))
    assert noise.low < 0 < noise.high and noise.verdict == "no significant change"
    assert verdict(0.01, -0.001, 0.05) == "no significant change"  # significant p, interval inside 0: no claim
    none = paired_difference([1, 0, 1], [1, 0, 1])
    assert none.diff == 0 and none.p_value == 1.0 and none.low <= 0 <= none.high
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1, 0], [1])


def test_paired_metrics_per_task_and_headroom_warning():
    rows = [{"task": "a"}] * 4 + [{"task": "b"}] * 2
    metrics = paired_metrics(rows, [0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 1, 0])
    assert metrics["task_accuracy_from"] == pytest.approx(3 / 6) and metrics["task_accuracy_to"] == pytest.approx(4 / 6)
    assert (metrics["a_accuracy_gained"], metrics["a_accuracy_lost"], metrics["a_accuracy_n"]) == (2, 1, 4)
    assert metrics["b_accuracy_diff"] == 0 and metrics["b_accuracy_p"] == 1.0
    assert headroom_warning({"headroom": 0.2, "pass_at_8": 0.5}) is None
    assert "pass@8 - greedy = 0.010" in headroom_warning({"headroom": 0.01, "pass_at_8": 0.3})


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_within_group_auc_of_planted_scores():
    groups = [
        ([0.9, 0.1, 0.5], [1, 0, 0]),  # right above both wrong: 2 of 2
        ([0.2, 0.8, 0.2], [1, 0, 0]),  # below one, tied with one: 0.5 of 2
        ([0.3, 0.3], [1, 1]),  # no wrong sample: not informative, ignored
        ([0.7, 0.4, 0.6, 0.1], [1, 1, 0, 0]),  # 0.7 beats both, 0.4 beats 0.1 only: 3 of 4
    ]
    result = within_group_auc(groups)
    assert result.pairs == 8 and result.groups == 3
    assert result.auc == pytest.approx((2 + 0.5 + 3) / 8)
    assert result.low <= result.auc <= result.high
    assert within_group_auc([([1, 2], [0, 1])] * 5).auc == 1.0
    assert within_group_auc([([1, 2], [1, 0])] * 5).auc == 0.0
    assert math.isnan(within_group_auc([([1, 2], [1, 1])]).auc)


def test_wilson_interval_holds_its_estimate_at_zero_and_n():
    # Rounding used to put the bound past p (0 successes of 17: a lower bound of 1.4e-17), and the report's error
    # bars then had a negative length, which matplotlib refuses.
    for n in range(1, 200):
        for k in (0, n):
            low, high = wilson_interval(k, n)
            assert low <= k / n <= high, (k, n, low, high)
