"""Known answers for the statistics: coverage, exact tests, thresholds, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrlab.evaluation import stats
from cxrlab.evaluation.metrics import classification_metrics


def test_stratified_resamples_keep_class_sizes():
    y = np.array([0] * 7 + [1] * 3)
    idx = stats.stratified_indices(y, 50, seed=1)
    assert idx.shape == (50, 10)
    assert ((y[idx] == 1).sum(axis=1) == 3).all()
    assert np.array_equal(idx, stats.stratified_indices(y, 50, seed=1))


def test_vectorised_metrics_equal_the_reference_implementation():
    rng = np.random.default_rng(0)
    for k in (2, 3):
        y = rng.integers(0, k, 200)
        prob = rng.dirichlet(np.ones(k), 200)
        prob[np.arange(200), y] += 0.3  # some skill
        prob /= prob.sum(1, keepdims=True)
        positive = k - 1
        reference = classification_metrics(y, prob, [str(i) for i in range(k)], str(positive))
        full = np.arange(200)[None, :]
        fast = stats.resampled_metrics(y, [prob], full, positive)
        for name in stats.INTERVAL_METRICS:
            ref = reference
            for part in name.split("."):
                ref = ref[part]
            assert fast[name][0] == pytest.approx(ref), (k, name)


def test_auc_from_ranks_handles_ties_like_sklearn():
    y = np.array([0, 0, 1, 1, 0, 1])
    score = np.array([0.2, 0.5, 0.5, 0.9, 0.1, 0.2])
    prob = np.stack([1 - score, score], 1)
    assert stats.auc_batch(y[None], prob[None], 1)[0] == pytest.approx(roc_auc_score(y, score))


def test_bootstrap_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    # A classifier with known per-class accuracy (specificity 0.95 on 200 negatives,
    # sensitivity 0.80 on 100 positives): true accuracy at this class mix is 0.90.
    # 400 simulated test sets; coverage has a standard error of sqrt(.95*.05/400) = 1.1
    # points, and percentile intervals run slightly narrow at this size, so we accept
    # 90-98 % (about -4.5 / +2.7 standard errors around 95 %).
    rng = np.random.default_rng(2024)
    y = np.array([0] * 200 + [1] * 100)
    p_right = np.where(y == 0, 0.95, 0.80)
    covered = 0
    repetitions = 400
    for r in range(repetitions):
        right = rng.random(300) < p_right
        pred = np.where(right, y, 1 - y)
        prob = np.stack([1.0 - pred, pred.astype(float)], 1)
        ci = stats.bootstrap_intervals(y, [prob], 1, resamples=500, seed=r, level=0.95)["accuracy"]
        covered += ci["low"] <= 0.90 <= ci["high"]
    assert 0.90 <= covered / repetitions <= 0.98


def test_mcnemar_matches_the_exact_binomial_value():
    # discordant pairs: A right/B wrong 2, A wrong/B right 9 -> two-sided binomial(2; 11, 0.5)
    a = np.array([1] * 2 + [0] * 9 + [1] * 30 + [0] * 5, bool)
    b = np.array([0] * 2 + [1] * 9 + [1] * 30 + [0] * 5, bool)
    result = stats.mcnemar_exact(a, b)
    expected = 2 * sum(math.comb(11, i) for i in range(3)) / 2 ** 11  # = 0.06543
    assert (result["a_right_b_wrong"], result["a_wrong_b_right"]) == (2, 9)
    assert result["p_value"] == pytest.approx(expected)
    assert stats.mcnemar_exact(a, a)["p_value"] == 1.0


def test_holm_adjusts_in_order():
    assert stats.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None], nan_ok=True)
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]


def test_holm_over_one_family_matches_the_hand_computed_step_down():
    # Holm (1979), as statsmodels' multipletests(method="holm"): sort, multiply the i-th smallest
    # by (m - i + 1), keep the running maximum, cap at 1. Sorted: 0.005*5=0.025, 0.01*4=0.04,
    # 0.03*3=0.09, 0.04*2=0.08 -> 0.09 (running max), 0.2*1=0.2.
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    assert stats.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.2])
    # rejected at 0.05: only the two smallest, where per-metric families of the same tests would reject more
    assert [a < 0.05 for a in stats.holm(p)] == [True, False, False, True, False]


def test_paired_bootstrap_of_identical_models_is_zero_and_of_a_better_one_is_positive():
    rng = np.random.default_rng(3)
    y = np.array([0] * 300 + [1] * 100)
    noisy = np.clip(y + rng.normal(0, 0.6, 400), 0, 1)
    clean = np.clip(y + rng.normal(0, 0.2, 400), 0, 1)
    pa, pb = np.stack([1 - noisy, noisy], 1), np.stack([1 - clean, clean], 1)
    same = stats.paired_bootstrap(y, pa, pa, 1, ("f1", "roc_auc"), 300, 0, 0.95)
    assert same["f1"]["difference"] == 0 and same["f1"]["low"] == same["f1"]["high"] == 0
    assert same["f1"]["p_value"] == 1.0
    better = stats.paired_bootstrap(y, pa, pb, 1, ("f1", "roc_auc"), 300, 0, 0.95)
    assert better["f1"]["difference"] > 0 and better["f1"]["low"] > 0
    assert better["roc_auc"]["p_value"] < 0.05


def test_a_clear_winner_gets_the_floor_p_value_never_zero():
    y = np.array([0] * 50 + [1] * 50)
    perfect = np.eye(2)[y].astype(float)
    coin = np.full((100, 2), 0.5)
    r = stats.paired_bootstrap(y, coin, perfect, 1, ("accuracy", "roc_auc"), 999, 0, 0.95)
    # no resample crosses zero: (1 + 0) / (999 + 1), doubled
    assert r["roc_auc"]["p_value"] == 2 / 1000 == stats.p_value_floor(999)
    assert r["roc_auc"]["p_at_floor"] and r["accuracy"]["p_value"] > 0
    assert stats.bootstrap_p_value(np.array([-1.0, 2.0, 3.0])) == pytest.approx(2 * 2 / 4)
    assert stats.bootstrap_p_value(np.array([np.nan])) is None


def test_threshold_rule_takes_the_order_statistic_that_keeps_the_expected_sensitivity():
    positive = np.array([1] * 10 + [0] * 5, bool)
    score = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.65, 0.55, 0.1, 0.05, 0.35])
    # n = 10: k = floor(0.1 * 11) = 1 -> the lowest positive score; target 0.8: k = floor(0.2 * 11) = 2
    assert stats.threshold_for_sensitivity(positive, score, 0.90) == 0.2
    assert stats.threshold_for_sensitivity(positive, score, 0.80) == 0.3
    assert [stats.threshold_rank(n, 0.9) for n in (9, 10, 20, 64, 200)] == [1, 1, 2, 6, 20]
    # 0.9 needs 9 positives (k >= 1), 0.95 needs 19; never fewer than MIN_POSITIVES
    assert (stats.min_positives(0.9), stats.min_positives(0.95), stats.min_positives(0.5)) == (9, 19, 5)
    assert stats.threshold_for_sensitivity(positive[:8].copy(), score[:8], 0.9) is None  # 8 positives
    assert stats.threshold_for_sensitivity(np.zeros(3, bool), np.ones(3), 0.9) is None


@pytest.mark.parametrize("n", [20, 64, 200])
def test_threshold_rule_meets_the_target_sensitivity_on_average_over_new_data(n):
    # positives' scores uniform on [0, 1]: a threshold t has true sensitivity 1 - t.
    # 20,000 simulated validation sets; the standard error of the mean is at most 0.0005.
    rng = np.random.default_rng(0)
    scores = rng.random((20_000, n))
    k = stats.threshold_rank(n, 0.9)
    rule = 1 - np.sort(scores, axis=1)[:, k - 1]
    assert rule.mean() >= 0.9
    assert rule.mean() == pytest.approx(1 - k / (n + 1), abs=0.002)
    assert stats.threshold_for_sensitivity(np.ones(n, bool), scores[0], 0.9) == pytest.approx(1 - rule[0])
    # the naive rule (exactly 90 % of validation positives at or above t) falls short on average
    naive = 1 - np.sort(scores, axis=1)[:, n - math.ceil(0.9 * n)]
    assert naive.mean() < 0.9


def test_clopper_pearson_matches_the_closed_forms():
    # x = n - 1: upper = (1 - alpha/2)^(1/n); x = n: lower = (alpha/2)^(1/n), upper = 1
    assert stats.clopper_pearson(9, 10, 0.95)["high"] == pytest.approx(0.975 ** 0.1)
    assert stats.clopper_pearson(10, 10, 0.95) == pytest.approx({"low": 0.025 ** 0.1, "high": 1.0})
    assert stats.clopper_pearson(0, 0, 0.95) == {"low": None, "high": None}


def test_resampling_seeds_widens_the_interval_to_cover_seed_to_seed_spread():
    # three "seeds" of very different accuracy (0.6, 0.75, 0.9) on the same 400 images
    rng = np.random.default_rng(7)
    y = np.array([0] * 200 + [1] * 200)
    probs = []
    for acc in (0.6, 0.75, 0.9):
        right = rng.random(400) < acc
        pred = np.where(right, y, 1 - y)
        probs.append(np.stack([1.0 - pred, pred.astype(float)], 1))
    test_only = stats.bootstrap_intervals(y, probs, 1, 500, 0, 0.95)["accuracy"]
    both = stats.bootstrap_intervals(y, probs, 1, 500, 0, 0.95, resample_models=True)["accuracy"]
    assert test_only["high"] - test_only["low"] < 0.06  # test sampling of a mean of three: narrow
    assert both["low"] < 0.67 and both["high"] > 0.83  # seeds drawn again: spans most of the seeds
    weights = stats.seed_weights(3, 500, 0)
    assert weights.shape == (3, 500) and np.allclose(weights.sum(axis=0), 1)


def test_ece_is_near_zero_when_calibrated_and_near_the_gap_when_not():
    rng = np.random.default_rng(5)
    n = 60_000
    confidence = rng.uniform(0.5, 1.0, n)
    y = (rng.random(n) < confidence).astype(int)  # predicted class 1 is right with prob = confidence
    prob = np.stack([1 - confidence, confidence], 1)
    ece, bins = stats.calibration(y, prob, 15)
    assert ece < 0.01
    assert sum(b["count"] for b in bins) == n

    # always 90 % confident, right 70 % of the time: ECE = 0.2
    y = (rng.random(n) < 0.7).astype(int)
    prob = np.tile([0.1, 0.9], (n, 1))
    ece, _ = stats.calibration(y, prob, 15)
    assert ece == pytest.approx(0.2, abs=0.01)
