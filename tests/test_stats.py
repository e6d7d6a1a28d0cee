"""Known answers for the statistics: coverage, exact tests, thresholds, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrlab.evaluation import paired, stats
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
        for name, (x, n) in stats.proportion_counts(y, [prob], positive).items():  # the exact intervals' counts
            assert x / n == pytest.approx(reference[name]), (k, name)


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
    result = paired.mcnemar_exact(a, b)
    expected = 2 * sum(math.comb(11, i) for i in range(3)) / 2 ** 11  # = 0.06543
    assert (result["a_right_b_wrong"], result["a_wrong_b_right"]) == (2, 9)
    assert result["p_value"] == pytest.approx(expected)
    assert paired.mcnemar_exact(a, a)["p_value"] == 1.0


def test_holm_adjusts_in_order():
    assert paired.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None], nan_ok=True)
    assert paired.holm([0.5, 0.9]) == [1.0, 1.0]


def test_holm_over_one_family_matches_the_hand_computed_step_down():
    # Holm (1979), as statsmodels' multipletests(method="holm"): sort, multiply the i-th smallest
    # by (m - i + 1), keep the running maximum, cap at 1. Sorted: 0.005*5=0.025, 0.01*4=0.04,
    # 0.03*3=0.09, 0.04*2=0.08 -> 0.09 (running max), 0.2*1=0.2.
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    assert paired.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.2])
    # rejected at 0.05: only the two smallest, where per-metric families of the same tests would reject more
    assert [a < 0.05 for a in paired.holm(p)] == [True, False, False, True, False]


def test_paired_bootstrap_of_identical_models_is_zero_and_of_a_better_one_is_positive():
    rng = np.random.default_rng(3)
    y = np.array([0] * 300 + [1] * 100)
    noisy = np.clip(y + rng.normal(0, 0.6, 400), 0, 1)
    clean = np.clip(y + rng.normal(0, 0.2, 400), 0, 1)
    pa, pb = np.stack([1 - noisy, noisy], 1), np.stack([1 - clean, clean], 1)
    same = paired.paired_bootstrap(y, pa, pa, 1, ("f1", "roc_auc"), 300, 0, 0.95)
    assert same["f1"]["difference"] == 0 and same["f1"]["low"] == same["f1"]["high"] == 0
    assert paired.permutation_p_values(y, pa, pa, 1, ("f1", "roc_auc"), 300, 0) == {"f1": 1.0, "roc_auc": 1.0}
    better = paired.paired_bootstrap(y, pa, pb, 1, ("f1", "roc_auc"), 300, 0, 0.95)
    assert better["f1"]["difference"] > 0 and better["f1"]["low"] > 0
    assert paired.permutation_p_values(y, pa, pb, 1, ("roc_auc",), 300, 0)["roc_auc"] < 0.05


def test_a_clear_winner_gets_the_floor_p_value_never_zero():
    y = np.array([0] * 50 + [1] * 50)
    perfect = np.eye(2)[y].astype(float)
    coin = np.full((100, 2), 0.5)
    p = paired.permutation_p_values(y, coin, perfect, 1, ("f1", "roc_auc"), 999, 0)
    # no swap reaches the observed difference: (1 + 0) / (999 + 1)
    assert p["roc_auc"] == 1 / 1000 == paired.p_value_floor(999)
    assert p["f1"] == 1 / 1000


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


# ---------------------------------------------------------------- issue 27: exact intervals, level, rules
def test_12_of_12_positives_get_an_exact_interval_and_no_met_verdict():
    # the percentile bootstrap collapses to [1, 1] here and so said "met" for a 0.9 target
    y = np.array([0] * 12 + [1] * 12)
    perfect = np.eye(2)[y].astype(float)
    assert stats.bootstrap_intervals(y, [perfect], 1, 200, 0, 0.95)["sensitivity"] == {"low": 1.0, "high": 1.0}
    ci = stats.intervals(y, [perfect], 1, 200, 0, 0.95)
    assert ci["sensitivity"]["low"] == pytest.approx(0.025 ** (1 / 12)) == pytest.approx(0.7354, abs=1e-4)
    assert ci["sensitivity"]["high"] == 1.0 and ci["accuracy"]["low"] == pytest.approx(0.025 ** (1 / 24))
    assert stats.verdict(ci["sensitivity"]["low"], ci["sensitivity"]["high"], 0.9) == "inconclusive"
    # also with resampled seeds (the envelope of exact and hierarchical bootstrap)
    both = stats.intervals(y, [perfect] * 5, 1, 200, 0, 0.95, resample_models=True)
    assert both["sensitivity"]["low"] == pytest.approx(0.7354, abs=1e-4)
    # integer counts: exactly scipy's binomtest interval; a seed-mean count lies between its neighbours'
    for x, n in ((0, 12), (7, 12), (12, 12), (57, 64)):
        assert stats.exact_interval(x, n, 0.95) == pytest.approx(stats.clopper_pearson(x, n, 0.95))
    half = stats.exact_interval(7.5, 12, 0.95)
    assert stats.exact_interval(7, 12, 0.95)["low"] < half["low"] < stats.exact_interval(8, 12, 0.95)["low"]


def test_verdict_reads_the_interval():
    assert stats.verdict(0.91, 0.99, 0.9) == "met" and stats.verdict(0.9, 0.99, 0.9) == "met"
    assert stats.verdict(0.70, 0.89, 0.9) == "not met"
    assert stats.verdict(0.735, 1.0, 0.9) == "inconclusive"
    assert stats.verdict(None, 1.0, 0.9) == stats.verdict(0.95, None, 0.9) == "inconclusive"
    assert stats.joint_verdict(["met", "met"]) == "met"
    assert stats.joint_verdict(["met", "inconclusive"]) == "inconclusive"
    assert stats.joint_verdict(["inconclusive", "not met"]) == "not met"


def test_paired_tests_keep_their_level_at_12_images_per_class():
    # Under the null the two models are exchangeable on every image: both scores drawn from the same
    # distribution. 400 simulated test sets of 12 + 12 images, 200 permutations each: each test's
    # rejection rate at 0.05 must stay <= 0.05 + 2 SE (SE = sqrt(.05 x .95 / 400) = 0.011).
    rng = np.random.default_rng(27)
    y = np.array([0] * 12 + [1] * 12)
    repetitions, rejected = 400, {"f1": 0, "roc_auc": 0, "accuracy": 0}
    for r in range(repetitions):
        score = 1 / (1 + np.exp(-(rng.normal(0, 1.2, (2, 24)) + 1.5 * (y - 0.5))))
        pa, pb = (np.stack([1 - s, s], 1) for s in score)
        p = paired.permutation_p_values(y, pa, pb, 1, ("f1", "roc_auc"), 200, r)
        p["accuracy"] = paired.mcnemar_exact(pa.argmax(1) == y, pb.argmax(1) == y)["p_value"]
        for m in rejected:
            rejected[m] += p[m] < 0.05
    limit = 0.05 + 2 * math.sqrt(0.05 * 0.95 / repetitions)
    assert all(n / repetitions <= limit for n in rejected.values()), rejected
    assert rejected["roc_auc"] > 0  # a test that never rejects would pass too: it does reject sometimes


def test_holm_floor_raises_the_permutations_or_warns():
    # the old bootstrap floor 2/(B+1) at B = 1,000 and 39 tests: 0.078 >= 0.05, Holm could never reject
    warning = paired.holm_floor_warning(2 / 1001, 39, 0.05)
    assert "times the 39 tests of the Holm family is 0.0779 >= alpha 0.05" in warning
    assert "raise stats.resamples to at least 1559" in warning
    assert paired.holm_floor_warning(paired.p_value_floor(1000), 39, 0.05) is None
    for tests in (3, 39, 150):
        b = paired.permutations_for(tests, 0.05, 1000)
        assert b >= 1000 and paired.p_value_floor(b) * tests <= 0.05 / 2
        assert paired.holm_floor_warning(paired.p_value_floor(b), tests, 0.05) is None
    assert paired.permutations_for(150, 0.05, 1000) == 5999
    # a family whose smallest Holm p-value reaches alpha is told, never silently unable to reject
    assert paired.holm([paired.p_value_floor(1000)] * 60)[0] >= 0.05
    assert paired.holm_floor_warning(paired.p_value_floor(1000), 60, 0.05) is not None


def test_tolerance_rule_k_is_the_largest_with_binomial_probability_095():
    from scipy.stats import binom

    for n in (29, 30, 64, 100, 200, 1000):
        k = stats.threshold_rank(n, 0.9, "tolerance")
        assert binom.sf(k - 1, n, 0.1) >= 0.95 > binom.sf(k, n, 0.1), n  # P(X >= k) >= .95 > P(X >= k + 1)
    assert stats.threshold_rank(100, 0.9, "tolerance") == 5  # P(Bin(100, .1) >= 5) = 0.976, >= 6: 0.942
    assert stats.threshold_rank(28, 0.9, "tolerance") == 0
    assert stats.min_positives(0.9, "tolerance") == 29 and stats.min_positives(0.8, "tolerance") == 14
    # the guarantee, simulated: positives' scores uniform, sensitivity at threshold s is 1 - s
    rng = np.random.default_rng(1)
    scores = np.sort(rng.random((20_000, 64)), axis=1)
    sens = 1 - scores[:, stats.threshold_rank(64, 0.9, "tolerance") - 1]
    assert (sens >= 0.9).mean() >= 0.95 - 0.004
    # the expected rule: mean >= 0.9, but a run falls short about as often as shortfall_probability says
    k = stats.threshold_rank(64, 0.9)
    short = (1 - scores[:, k - 1] < 0.9).mean()
    assert short == pytest.approx(stats.shortfall_probability(64, k, 0.9), abs=0.01)
    assert [round(stats.shortfall_probability(n, stats.threshold_rank(n, 0.9), 0.9), 2) for n in (9, 20, 200)] == \
        [0.39, 0.39, 0.47]


def test_ece_interval_and_the_ece_of_a_calibrated_model_at_that_size():
    rng = np.random.default_rng(4)
    confidence = rng.uniform(0.5, 1.0, 24)
    prob = np.stack([1 - confidence, confidence], 1)
    y = (rng.random(24) < confidence).astype(int)  # calibrated by construction
    # the vectorised ECE is calibration()'s, row by row
    idx = stats.stratified_indices(y, 20, 0)
    fast = stats.ece_batch(y[idx], prob[idx], 15)
    assert fast == pytest.approx([stats.calibration(y[i], prob[i], 15)[0] for i in idx])
    ci = stats.ece_interval(y, [prob], 15, 300, 0, 0.95)
    assert ci["low"] <= stats.calibration(y, prob, 15)[0] <= ci["high"]
    # a perfectly calibrated model at 24 images still has a mean ECE of 0.14-0.18 (the audit: 0.18); the
    # same number by a plain loop over stats.calibration; much smaller at 2,400 images
    expected = stats.calibrated_ece([prob], 15, 2000, 0)
    loop = np.mean([stats.calibration((rng.random(24) < confidence).astype(int), prob, 15)[0] for _ in range(2000)])
    assert expected == pytest.approx(loop, abs=0.01) and 0.12 < expected < 0.21
    big = np.tile(prob, (100, 1))
    assert stats.calibrated_ece([big], 15, 200, 0) < expected / 4
