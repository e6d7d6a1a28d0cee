"""From test predictions to the evaluate report of one checkpoint kind (best or last).

For each seed: the metrics at the argmax (0.5) decision, a confidence
interval beside each headline value (`accuracy` then `accuracy_ci`), the
expected calibration error, and the operating point (a threshold chosen on
validation for a target sensitivity) with its test sensitivity and
specificity and whether it meets the WHO target product profile.

With several seeds, the headline is the mean over seeds, `<metric>_sd` the
standard deviation across seeds (training noise), and `<metric>_ci` a
bootstrap interval of the seed-averaged metric (test-sample noise).
"""

from __future__ import annotations

import numpy as np

from cxrlab.config.schema import EvaluateParams, StatsParams
from cxrlab.evaluation import stats
from cxrlab.evaluation.metrics import classification_metrics


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def with_intervals(metrics: dict, intervals: dict[str, dict], suffix: str = "_ci") -> dict:
    """`metrics` with `<name>_ci` inserted right after each `<name>` of `intervals` (nested for macro.*)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and any(n.startswith(key + ".") for n in intervals):
            inner = {n.split(".", 1)[1]: v for n, v in intervals.items() if n.startswith(key + ".")}
            out[key] = with_intervals(value, inner, suffix)
            continue
        out[key] = value
        if key in intervals:
            out[key + suffix] = intervals[key]
    return out


def operating_point(y_val, prob_val, y_test, probs_test: list[np.ndarray], thresholds: list[float | None],
                    positive: int, ev: EvaluateParams, st: StatsParams) -> dict | None:
    """Test sensitivity and specificity at the validation-chosen threshold(s), with intervals."""
    if any(t is None for t in thresholds):
        return None
    full = np.arange(len(y_test))[None, :]
    point = stats.resampled_metrics(y_test, probs_test, full, positive, thresholds)
    ci = stats.bootstrap_intervals(y_test, probs_test, positive, st.resamples, st.seed, st.ci_level, thresholds)
    test = {}
    for name in ("sensitivity", "specificity", "accuracy", "f1"):
        test[name] = float(point[name][0])
        test[name + "_ci"] = ci[name]
    tpp = ev.who_tpp
    result = {
        "rule": ("the highest threshold on the positive class's probability whose validation "
                 f"sensitivity is >= {ev.target_sensitivity}"),
        "target_sensitivity": ev.target_sensitivity,
        "threshold": float(np.mean(thresholds)),
        "test": test,
        "who_tpp": {"sensitivity": tpp.sensitivity, "specificity": tpp.specificity},
        "meets_who_tpp": bool(test["sensitivity"] >= tpp.sensitivity and test["specificity"] >= tpp.specificity),
        "meets_who_tpp_at_ci_low": bool(
            (test["sensitivity_ci"]["low"] or 0) >= tpp.sensitivity
            and (test["specificity_ci"]["low"] or 0) >= tpp.specificity),
    }
    if y_val is not None and len(y_val):
        val = stats.resampled_metrics(y_val, prob_val, np.arange(len(y_val))[None, :], positive, thresholds)
        result["val"] = {"sensitivity": float(val["sensitivity"][0]), "specificity": float(val["specificity"][0])}
    return result


def seed_report(y, prob, y_val, prob_val, classes: list[str], positive: str,
                ev: EvaluateParams, st: StatsParams) -> tuple[dict, list[dict]]:
    """One seed's checkpoint on the test set; returns (report, reliability bins)."""
    pos = classes.index(positive)
    metrics = classification_metrics(y, prob, classes, positive)
    intervals = stats.bootstrap_intervals(y, [prob], pos, st.resamples, st.seed, st.ci_level)
    report = with_intervals(metrics, intervals)
    report["ece"], bins = stats.calibration(y, prob, ev.calibration_bins)
    if len(classes) == 2:
        threshold = threshold_on_validation(y_val, prob_val, pos, ev.target_sensitivity)
        report["operating_point"] = operating_point(
            y_val, [prob_val] if y_val is not None else None, y, [prob], [threshold], pos, ev, st)
    return report, bins


def threshold_on_validation(y_val, prob_val, positive: int, target: float) -> float | None:
    if y_val is None or not len(y_val):
        return None
    return stats.threshold_for_sensitivity(np.asarray(y_val) == positive, prob_val[:, positive], target)


def mean_report(reports: list[dict]) -> dict:
    """The mean of several seeds' reports, leaf by leaf (None if any is None; bools: all)."""
    first = reports[0]
    out = {}
    for key, value in first.items():
        values = [r.get(key) for r in reports]
        if isinstance(value, dict):
            out[key] = mean_report(values) if all(isinstance(v, dict) for v in values) else None
        elif isinstance(value, bool):
            out[key] = all(values)
        elif isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in values):
            out[key] = float(np.mean(values))
        else:
            out[key] = value if all(v == value for v in values) else None
    return out


def seeds_report(y, probs: list[np.ndarray], y_val, probs_val: list[np.ndarray] | None, per_seed: list[dict],
                 classes: list[str], positive: str, ev: EvaluateParams, st: StatsParams) -> dict:
    """The headline of several seeds: mean, sd across seeds, and the interval of the mean."""
    pos = classes.index(positive)
    headline = mean_report(per_seed)
    intervals = stats.bootstrap_intervals(y, probs, pos, st.resamples, st.seed, st.ci_level)
    for name in stats.INTERVAL_METRICS:
        parent, _, leaf = name.rpartition(".")
        node = _get(headline, parent) if parent else headline
        node[leaf + "_ci"] = intervals[name]
        node[leaf + "_sd"] = float(np.std([_get(r, name) for r in per_seed], ddof=1))
    headline["ece_sd"] = float(np.std([r["ece"] for r in per_seed], ddof=1))
    if len(classes) == 2:
        thresholds = [threshold_on_validation(y_val, pv, pos, ev.target_sensitivity) for pv in (probs_val or [])]
        headline["operating_point"] = operating_point(y_val, probs_val, y, probs, thresholds or [None], pos, ev, st)
    return headline
