"""From test predictions to the evaluate report of one checkpoint kind (best or last), and its headline.

For each seed: the operating point (a threshold chosen on validation for a
target sensitivity, see `stats.threshold_for_sensitivity`) with its test
sensitivity and specificity and whether it meets the screening target of
params (`evaluate.screening`); the metrics and confusion matrix at that
threshold, the one decision rule of every output (at the argmax (0.5) when
validation gives no threshold, or for more than two classes), a confidence
interval beside each headline value (`accuracy` then `accuracy_ci`); the
expected calibration error; and `argmax`: the same metrics at the argmax
(0.5) decision, a secondary view.

With several seeds, the headline is the mean over seeds, `<metric>_sd` the
standard deviation across seeds (training noise), and `<metric>_ci` the
interval of the seed-averaged metric: over test images only, or, with
`stats.resample_seeds` and five or more seeds, over seeds and test images
together. Proportions (accuracy, sensitivity, specificity, precision) get
exact Clopper-Pearson intervals, F1, ROC AUC, macro averages and ECE a
bootstrap (`stats.intervals`). `INTERVALS` names what each covers; the
report says which (`intervals`, `interval_kind`) and how (`interval_methods`).

`headline` picks the few numbers `metrics.json` holds for `dvc exp show`.
"""

from __future__ import annotations

import re

import numpy as np

from cxrlab.config.schema import EvaluateParams, ScreeningParams, StatsParams
from cxrlab.evaluation import stats
from cxrlab.evaluation.metrics import classification_metrics

INTERVALS = {
    "test": "test sampling: a stratified bootstrap of the test images, the trained model(s) held fixed",
    "seeds+test": "seeds and test sampling: a hierarchical bootstrap drawing the seeds and the test images",
}
# Fewer seeds say too little about seed-to-seed spread to resample them: at 3 seeds a hierarchical
# bootstrap interval of sensitivity covered 0.845 in simulation, 0.90 at 5 (issue 27).
MIN_SEEDS_TO_RESAMPLE = 5


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def interval_kind(seeds: int, st: StatsParams) -> str:
    """The key of `INTERVALS` that the intervals of a `seeds`-run report cover."""
    return "seeds+test" if st.resample_seeds and seeds >= MIN_SEEDS_TO_RESAMPLE else "test"


def tb_like(class_name: str) -> bool:
    """Whether a class name says tuberculosis: `TB`, `tb_positive`, `Tuberculosis` (not `tablet`)."""
    return re.search(r"(^|[^a-z])tb([^a-z]|$)|tubercul", class_name.lower()) is not None


def screening_target(ev: EvaluateParams, positive_class: str) -> tuple[ScreeningParams | None, str]:
    """The screening target that applies to `positive_class`, and a sentence saying which (or why none)."""
    target = ev.screening
    if target is None:
        return None, "no screening target (evaluate.screening is null)"
    if target.tb_only and not tb_like(positive_class):
        return None, (f"no screening target: {target.name} is for tuberculosis and the positive class is "
                      f"{positive_class} (set evaluate.screening for it, with tb_only: false)")
    return target, (f"screening target {target.name}: sensitivity >= {target.sensitivity}, "
                    f"specificity >= {target.specificity}")


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


def operating_point(y_val, probs_val: list[np.ndarray] | None, y_test, probs_test: list[np.ndarray],
                    runs: list[str], classes: list[str], positive_class: str,
                    ev: EvaluateParams, st: StatsParams) -> dict:
    """The validation-chosen threshold of each run (`runs`: labels such as `seed_42`) and the test
    sensitivity and specificity there, averaged over runs, with intervals; or why there is none."""
    pos = classes.index(positive_class)
    target, rule = ev.target_sensitivity, ev.threshold_rule
    n_pos = int(np.sum(np.asarray(y_val) == pos)) if y_val is not None else 0
    k = stats.threshold_rank(n_pos, target, rule)
    result: dict = {"rule": rule_text(rule, k, n_pos, target, positive_class), "threshold_rule": rule,
                    "target_sensitivity": target, "validation_positives": n_pos}
    screening, result["target_text"] = screening_target(ev, positive_class)
    result["target"] = screening.model_dump() if screening else None
    needed = stats.min_positives(target, rule)
    if n_pos < needed:
        result["thresholds"] = None
        result["message"] = (f"{n_pos} validation images of {positive_class}: the {rule} threshold rule needs at "
                             f"least {needed} for target sensitivity {target}; no operating point, the metrics "
                             "are at the argmax only (raise data.val_fraction or add images"
                             + (", or use evaluate.threshold_rule: expected)" if rule == "tolerance" else ")"))
        return result
    thresholds = [stats.threshold_for_sensitivity(np.asarray(y_val) == pos, pv[:, pos], target, rule)
                  for pv in probs_val]
    result["thresholds"] = dict(zip(runs, thresholds))
    result["expected_sensitivity"] = 1 - k / (n_pos + 1)
    result["shortfall_probability"] = stats.shortfall_probability(n_pos, k, target)
    if n_pos < stats.FEW_POSITIVES:
        result["warning"] = (f"only {n_pos} validation images of {positive_class} (fewer than "
                             f"{stats.FEW_POSITIVES}): the threshold is uncertain; mind the validation "
                             "sensitivity's interval")
    val = stats.per_model_metrics(y_val, probs_val, np.arange(len(y_val))[None, :], pos, thresholds)
    val_sens = val["sensitivity"][:, 0]
    result["validation"] = {"sensitivity": float(val_sens.mean()),
                            "specificity": float(val["specificity"][:, 0].mean())}
    if len(runs) == 1:  # Clopper-Pearson of one run's count of positives caught
        result["validation"]["sensitivity_ci"] = stats.clopper_pearson(round(val_sens[0] * n_pos), n_pos,
                                                                       st.ci_level)
    full = np.arange(len(y_test))[None, :]
    point = stats.resampled_metrics(y_test, probs_test, full, pos, thresholds)
    ci = stats.intervals(y_test, probs_test, pos, st.resamples, st.seed, st.ci_level, thresholds,
                         resample_models=interval_kind(len(runs), st) == "seeds+test")
    test = {}
    for name in ("sensitivity", "specificity", "accuracy", "f1"):
        test[name] = float(point[name][0])
        test[name + "_ci"] = ci[name]
    result["test"] = test
    if rule == "tolerance":  # what the guarantee costs: the expected rule's thresholds and specificity
        other = [stats.threshold_for_sensitivity(np.asarray(y_val) == pos, pv[:, pos], target) for pv in probs_val]
        at_other = stats.resampled_metrics(y_test, probs_test, full, pos, other)
        result["expected_rule"] = {"thresholds": dict(zip(runs, other)),
                                   "test_sensitivity": float(at_other["sensitivity"][0]),
                                   "test_specificity": float(at_other["specificity"][0])}
        result["specificity_cost"] = result["expected_rule"]["test_specificity"] - test["specificity"]
    if screening:
        result.update(target_verdicts(test, screening))
    return result


# What does not depend on the decision rule (a report's `argmax` leaves these out).
DECISION_FREE = ("roc_auc", "roc_auc_ci", "loss", "n")


def decision_text(threshold: float | None, positive: str) -> str:
    """The decision rule of a report's headline metrics, in words."""
    if threshold is None:
        return "argmax (0.5): no operating threshold could be chosen on validation"
    return f"p({positive}) >= the operating threshold chosen on validation"


def target_verdicts(test: dict, screening: ScreeningParams) -> dict:
    """The screening target read on the exact intervals of the test sensitivity and specificity
    (`stats.verdict`: met / not met / inconclusive, each and jointly), and on the point estimates."""
    each = {name: stats.verdict(test[name + "_ci"]["low"], test[name + "_ci"]["high"], getattr(screening, name))
            for name in ("sensitivity", "specificity")}
    return {"verdict": stats.joint_verdict(list(each.values())), "verdict_by_metric": each,
            "meets_target": bool(test["sensitivity"] >= screening.sensitivity
                                 and test["specificity"] >= screening.specificity)}


def rule_text(rule: str, k: int, n_pos: int, target: float, positive_class: str) -> str:
    """The threshold rule stated whole: what it promises, how often it falls short, what weakens it."""
    head = f"per run, the {k}-th lowest score p({positive_class}) of the {n_pos} validation positives"
    if rule == "tolerance":
        head += (f" (the largest k with P(Binomial(n, 1 - {target}) >= k) >= {stats.TOLERANCE_CONFIDENCE}): "
                 f"sensitivity on new images >= {target} with probability {stats.TOLERANCE_CONFIDENCE}")
    else:
        head += (f" (k = floor((1 - {target}) x (n + 1))): the EXPECTED sensitivity on new images is "
                 f"1 - k / (n + 1) >= {target}, but a run falls short of {target} with probability "
                 "P(Binomial(n, 1 - t) < k) (shortfall_probability)")
    return head + ("; both assume new positives exchangeable with the validation ones: picking the best epoch "
                   "on the same images lowers the expectation a little, and the k-fold fold-mean model makes "
                   "the rule conservative")


def seed_report(y, prob, y_val, prob_val, classes: list[str], positive: str, run: str,
                ev: EvaluateParams, st: StatsParams) -> tuple[dict, list[dict]]:
    """One run's checkpoint (`run`: its label, e.g. `seed_42`) on the test set; returns (report, reliability bins).

    The metrics and the confusion matrix are at the run's operating threshold when validation gives one
    (`threshold`), else at the argmax; `argmax` repeats those that depend on the decision at the argmax
    (0.5), a secondary view."""
    op = None
    if len(classes) == 2:
        op = operating_point(y_val, [prob_val] if y_val is not None else None, y, [prob], [run], classes,
                             positive, ev, st)
    threshold = (op.get("thresholds") or {}).get(run) if op else None
    report: dict = {"decision": decision_text(threshold, positive), "threshold": threshold}
    report.update(_scored(y, prob, classes, positive, threshold, st))
    report["ece"], bins = stats.calibration(y, prob, ev.calibration_bins)
    report.update(ece_extras(y, [prob], ev, st))
    if op is not None:
        report["operating_point"] = op
    report["argmax"] = {k: v for k, v in _scored(y, prob, classes, positive, None, st).items()
                        if k not in DECISION_FREE}
    return report, bins


def _scored(y, prob, classes: list[str], positive: str, threshold: float | None, st: StatsParams) -> dict:
    """The metrics of one run's probabilities decided at `threshold` (None: argmax), each with its interval."""
    pos = classes.index(positive)
    metrics = classification_metrics(y, prob, classes, positive, threshold)
    intervals = stats.intervals(y, [prob], pos, st.resamples, st.seed, st.ci_level,
                                None if threshold is None else [threshold])
    return with_intervals(metrics, intervals)


def ece_extras(y, probs: list[np.ndarray], ev: EvaluateParams, st: StatsParams) -> dict:
    """`ece_ci`: the bootstrap interval of the (seed-mean) ECE; `ece_calibrated`: the mean ECE a perfectly
    calibrated model with the same confidences shows on this many images (ECE is biased upwards)."""
    return {"ece_ci": stats.ece_interval(y, probs, ev.calibration_bins, st.resamples, st.seed, st.ci_level),
            "ece_calibrated": stats.calibrated_ece(probs, ev.calibration_bins, st.resamples, st.seed)}


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
                 runs: list[str], classes: list[str], positive: str, ev: EvaluateParams, st: StatsParams) -> dict:
    """The headline of several seeds: mean, sd across seeds, and the interval of the mean; each seed's
    metrics at its own operating threshold (the same rule as its `seed_report`), `argmax` at the argmax."""
    pos = classes.index(positive)
    headline = mean_report(per_seed)
    resample = interval_kind(len(probs), st) == "seeds+test"
    thresholds = [r["threshold"] for r in per_seed]
    headline["threshold"] = None  # one per seed: operating_point.thresholds
    for node_of, at in ((lambda r: r, thresholds), (lambda r: r["argmax"], None)):
        if at is not None and any(t is None for t in at):
            at = None
        intervals = stats.intervals(y, probs, pos, st.resamples, st.seed, st.ci_level, at,
                                    resample_models=resample)
        target = node_of(headline)
        for name in stats.INTERVAL_METRICS:
            parent, _, leaf = name.rpartition(".")
            node = _get(target, parent) if parent else target
            if leaf not in node:  # roc_auc: not repeated under argmax
                continue
            node[leaf + "_ci"] = intervals[name]
            node[leaf + "_sd"] = float(np.std([_get(node_of(r), name) for r in per_seed], ddof=1))
    headline["ece_sd"] = float(np.std([r["ece"] for r in per_seed], ddof=1))
    headline.update(ece_extras(y, probs, ev, st))  # the interval of the seed-mean ECE, test sampling
    if len(classes) == 2:
        headline["operating_point"] = operating_point(y_val, probs_val, y, probs, runs, classes, positive, ev, st)
    return headline


# The headline numbers of a report in metrics.json: (key there, path in the report).
# All at the report's decision rule: the operating threshold when there is one (`threshold`, a single
# run's; several seeds each decide at their own, listed in report.json), else the argmax.
HEADLINE = (
    ("accuracy", "accuracy"), ("f1", "f1"), ("f1_low", "f1_ci.low"), ("f1_high", "f1_ci.high"),
    ("sensitivity", "sensitivity"), ("sensitivity_low", "sensitivity_ci.low"), ("specificity", "specificity"),
    ("roc_auc", "roc_auc"), ("roc_auc_low", "roc_auc_ci.low"), ("roc_auc_high", "roc_auc_ci.high"),
    ("ece", "ece"), ("threshold", "threshold"),
)


def headline(report: dict) -> dict[str, float]:
    """The few numbers of one checkpoint's report that `dvc exp show` displays: numbers only
    (a metric undefined on the data, or an operating point that could not be chosen, is left out)."""
    out = {}
    for key, path in HEADLINE:
        try:
            value = _get(report, path)
        except (KeyError, TypeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out

