"""The pure statistics of benchmarks/rerank.py: paired bootstrap intervals, gap closed, picks and AUC."""

from __future__ import annotations

import math

import pytest

from benchmarks.rerank import bootstrap_mean_ci, dev_test, gap_closed, pairwise_auc, pick_hits, target_met


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_prompts():
    few = [1.0, 0.0] * 10
    many = [1.0, 0.0] * 500
    m1, lo1, hi1 = bootstrap_mean_ci(few, reps=2000, seed=0)
    m2, lo2, hi2 = bootstrap_mean_ci(many, reps=2000, seed=0)
    assert m1 == m2 == 0.5
    assert lo1 < 0.5 < hi1 and lo2 < 0.5 < hi2
    assert hi2 - lo2 < hi1 - lo1
    # Normal approximation: half width ~ 1.96 * 0.5 / sqrt(1000) = 0.031.
    assert (hi2 - lo2) / 2 == pytest.approx(1.96 * 0.5 / math.sqrt(1000), rel=0.15)


def test_bootstrap_of_constant_differences_is_a_point_and_is_seeded():
    assert bootstrap_mean_ci([0.25] * 7, reps=100) == pytest.approx((0.25, 0.25, 0.25))
    assert bootstrap_mean_ci([0.0, 1.0, 0.5], seed=3) == bootstrap_mean_ci([0.0, 1.0, 0.5], seed=3)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))


def test_gap_closed():
    low, high = [0.0] * 10, [1.0] * 10
    assert gap_closed([0.5] * 10, low, high, reps=200)[0] == pytest.approx(0.5)
    assert gap_closed([1.0] * 10, low, high, reps=200) == pytest.approx((1.0, 1.0, 1.0))
    assert math.isnan(gap_closed([0.3] * 4, [0.2] * 4, [0.2] * 4)[0])  # no gap to close


def test_pick_hits_takes_the_top_score_and_the_first_of_ties():
    assert pick_hits([False, True, False], [0.1, 0.9, 0.5]) is True
    assert pick_hits([False, True], [1.0, 1.0]) is False


def test_pairwise_auc():
    assert pairwise_auc([([True, False], [2.0, 1.0])]) == 1.0
    assert pairwise_auc([([True, False], [1.0, 2.0])]) == 0.0
    assert pairwise_auc([([True, False, False], [1.0, 1.0, 0.0])]) == 0.75
    assert math.isnan(pairwise_auc([([True, True], [1.0, 2.0])]))  # no (correct, wrong) pair


def test_dev_test_split_is_disjoint_and_seeded():
    rows = [{"prompt": str(i)} for i in range(11)]
    dev, test = dev_test(rows, seed=1)
    assert len(dev) == 5 and len(test) == 6
    assert {r["prompt"] for r in dev}.isdisjoint(r["prompt"] for r in test)
    assert dev_test(rows, seed=1) == (dev, test)


def test_target_needs_both_lower_bounds_above_zero_and_half_the_gap():
    ok = {"reward_sum_minus_random": (0.2, 0.1, 0.3), "reward_sum_minus_student_lp": (0.1, 0.01, 0.2),
          "reward_sum_gap_closed": (0.6, 0.2, 1.0)}
    assert target_met(ok, "sum")
    assert not target_met({**ok, "reward_sum_minus_student_lp": (0.1, -0.01, 0.2)}, "sum")
    assert not target_met({**ok, "reward_sum_gap_closed": (0.4, 0.1, 0.9)}, "sum")
