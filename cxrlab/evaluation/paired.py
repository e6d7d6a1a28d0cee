"""Paired comparisons of two models on the same test images (the `compare` stage's statistics).

- Accuracy: McNemar's exact test on the discordant decisions.
- F1 and ROC AUC: a paired permutation (swap) test; p-values are never 0
  ((1 + count) / (B + 1)), and `permutations_for` makes B large enough for
  Holm to be able to reject in the whole family.
- Differences: paired stratified bootstrap intervals (the same resampled
  images for both models).
- Holm-Bonferroni over one family of p-values.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest

from cxrlab.evaluation.stats import batch_metrics, percentile_interval, resampled_metrics, stratified_indices


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test: two-sided binomial test of the discordant pairs.

    `b`: images A gets right and B wrong; `c`: the reverse.
    """
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    p = 1.0 if b + c == 0 else float(binomtest(min(b, c), b + c, 0.5).pvalue)
    return {"a_right_b_wrong": b, "a_wrong_b_right": c, "p_value": min(p, 1.0)}


def permutation_p_values(y, prob_a: np.ndarray, prob_b: np.ndarray, positive: int, metrics: tuple[str, ...],
                         permutations: int, seed: int) -> dict[str, float | None]:
    """Two-sided paired permutation (swap) test of "A and B score the same" for each of `metrics`.

    Under the null the two models' outputs for an image are exchangeable, so
    every permutation swaps them on a random half of the images and the
    difference B - A is scored again; p = (1 + count of |difference| >= the
    observed) / (permutations + 1) (Phipson & Smyth 2010): never 0, its floor
    `p_value_floor`. It keeps its level on small test sets where a bootstrap
    p-value is liberal. For ROC AUC it swaps the scores (a permutation test
    rather than DeLong's, which scipy does not provide).
    """
    y = np.asarray(y)
    prob_a, prob_b = np.asarray(prob_a, float), np.asarray(prob_b, float)
    observed = {m: batch_metrics(y[None], prob_b[None], positive)[m][0]
                - batch_metrics(y[None], prob_a[None], positive)[m][0] for m in metrics}
    rng = np.random.default_rng([seed, 2])
    extreme = dict.fromkeys(metrics, 0)
    done = 0
    while done < permutations:  # in blocks: memory stays ~ 1,000 x N x k
        size = min(1000, permutations - done)
        swap = (rng.random((size, len(y))) < 0.5)[..., None]
        y_b = np.broadcast_to(y, (size, len(y)))
        ma = batch_metrics(y_b, np.where(swap, prob_b, prob_a), positive)
        mb = batch_metrics(y_b, np.where(swap, prob_a, prob_b), positive)
        for m in metrics:
            # 1e-12: the same difference computed in another order counts as reached
            extreme[m] += int(np.sum(np.abs(mb[m] - ma[m]) >= abs(observed[m]) - 1e-12))
        done += size
    return {m: None if not np.isfinite(observed[m]) else (1 + extreme[m]) / (permutations + 1) for m in metrics}


def p_value_floor(permutations: int) -> float:
    """The smallest p-value `permutation_p_values` gives with `permutations` permutations."""
    return 1 / (permutations + 1)


def permutations_for(tests: int, alpha: float, wanted: int) -> int:
    """At least `wanted`, and enough that Holm over `tests` p-values can reject: the floor times the
    family size at most alpha / 2 (with B = 1,000 and 39 tests the smallest Holm p would be 0.039)."""
    return max(wanted, math.ceil(2 * tests / alpha) - 1)


def holm_floor_warning(floor: float, tests: int, alpha: float) -> str | None:
    """A sentence when the smallest p-value times the family size reaches alpha: Holm can never reject."""
    if floor * tests < alpha:
        return None
    return (f"the smallest p-value ({floor:.3g}) times the {tests} tests of the Holm family is "
            f"{floor * tests:.3g} >= alpha {alpha}: no difference can be significant; raise stats.resamples "
            f"to at least {permutations_for(tests, alpha, 0)}")


def paired_bootstrap(y, prob_a: np.ndarray, prob_b: np.ndarray, positive: int, metrics: tuple[str, ...],
                     resamples: int, seed: int, level: float) -> dict[str, dict]:
    """B minus A on the same resampled images: the difference and its percentile interval."""
    idx = stratified_indices(y, resamples, seed)
    da = resampled_metrics(y, [prob_a], idx, positive)
    db = resampled_metrics(y, [prob_b], idx, positive)
    full = np.arange(len(y))[None, :]
    point_a = resampled_metrics(y, [prob_a], full, positive)
    point_b = resampled_metrics(y, [prob_b], full, positive)
    return {name: {"difference": float(point_b[name][0] - point_a[name][0]),
                   **percentile_interval(db[name] - da[name], level)} for name in metrics}


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in the input order (None stays None)."""
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(present)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
