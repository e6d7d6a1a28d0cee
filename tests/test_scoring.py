"""Known answers for the evaluate report: the operating point, the screening target, the headline, exact CSVs."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from cxrlab.config.schema import EvaluateParams, StatsParams
from cxrlab.evaluation import scoring
from cxrlab.evaluation.evaluate import exact, write_rows

WHO = {"name": "WHO TPP, CXR triage test for TB", "sensitivity": 0.9, "specificity": 0.7, "tb_only": True}
ST = StatsParams(ci_level=0.95, resamples=200, seed=0, alpha=0.05, resample_seeds=False)


def evaluate_params(**changes) -> EvaluateParams:
    return EvaluateParams(**{"batch_size": 8, "target_sensitivity": 0.9, "threshold_rule": "expected", "screening": WHO,
                             "calibration_bins": 10, **changes})


def binary(score_positive: np.ndarray) -> np.ndarray:
    return np.stack([1 - score_positive, score_positive], 1)


def validation(n_pos: int, n_neg: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Positives scoring 0.51, 0.52, ... and negatives 0.01, 0.02, ... (all distinct)."""
    y = np.array([1] * n_pos + [0] * n_neg)
    score = np.concatenate([0.5 + np.arange(1, n_pos + 1) / 100, np.arange(1, n_neg + 1) / 100])
    return y, binary(score)


def test_operating_point_uses_the_order_statistic_and_warns_below_30_positives():
    y_val, p_val = validation(20)
    y_test, p_test = validation(10)
    op = scoring.operating_point(y_val, [p_val], y_test, [p_test], ["seed_42"], ["Healthy", "TB"], "TB",
                                 evaluate_params(), ST)
    # n = 20: k = floor(0.1 * 21) = 2 -> the 2nd lowest positive score, 0.52; 19 of 20 caught on validation
    assert op["thresholds"] == {"seed_42": pytest.approx(0.52)}
    assert op["validation_positives"] == 20 and op["expected_sensitivity"] == pytest.approx(1 - 2 / 21)
    assert op["validation"]["sensitivity"] == pytest.approx(0.95)
    assert op["validation"]["sensitivity_ci"]["low"] == pytest.approx(0.7513, abs=1e-4)  # Clopper-Pearson 19/20
    assert "only 20 validation images of TB (fewer than 30)" in op["warning"]
    assert op["test"]["sensitivity"] == pytest.approx(0.9) and op["test"]["specificity"] == 1.0
    assert op["target"]["name"] == WHO["name"] and op["meets_target"] is True
    # 9/10 test positives: exact interval [0.555, 0.997] straddles 0.9; 20/20 negatives: [0.832, 1] clears 0.7
    assert op["verdict_by_metric"] == {"sensitivity": "inconclusive", "specificity": "met"}
    assert op["verdict"] == "inconclusive"


def test_too_few_positives_give_no_threshold_and_a_message():
    y_val, p_val = validation(8)
    op = scoring.operating_point(y_val, [p_val], y_val, [p_val], ["seed_1"], ["Healthy", "TB"], "TB",
                                 evaluate_params(), ST)
    assert op["thresholds"] is None and "test" not in op
    assert op["message"].startswith("8 validation images of TB: the expected threshold rule needs at least 9")
    assert scoring.headline({"accuracy": 0.5, "operating_point": op}) == {"accuracy": 0.5}


def test_the_tb_screening_target_applies_only_to_a_tb_positive_class():
    ev = evaluate_params()
    assert [scoring.tb_like(c) for c in ("TB", "tb_positive", "Tuberculosis", "Pneumonia", "tablet")] == \
        [True, True, True, False, False]
    target, text = scoring.screening_target(ev, "Pneumonia")
    assert target is None and "WHO" in text and "for tuberculosis" in text
    target, text = scoring.screening_target(ev, "TB")
    assert target.name == WHO["name"] and text.startswith("screening target WHO TPP")
    mine = evaluate_params(screening={**WHO, "name": "my pneumonia target", "tb_only": False})
    target, text = scoring.screening_target(mine, "Pneumonia")
    assert target.name == "my pneumonia target" and "WHO" not in text
    assert scoring.screening_target(evaluate_params(screening=None), "TB")[0] is None

    y_val, p_val = validation(20)
    op = scoring.operating_point(y_val, [p_val], y_val, [p_val], ["seed_1"], ["Normal", "Pneumonia"],
                                 "Pneumonia", ev, ST)
    assert op["target"] is None and "meets_target" not in op  # never "WHO TPP met" for pneumonia


def test_several_seeds_list_each_threshold_and_label_their_intervals():
    y_val, p_val = validation(20)
    shifted = binary(np.clip(p_val[:, 1] + 0.1, 0, 1))
    op = scoring.operating_point(y_val, [p_val, shifted], y_val, [p_val, shifted], ["seed_1", "seed_2"],
                                 ["Healthy", "TB"], "TB", evaluate_params(), ST)
    assert op["thresholds"] == {"seed_1": pytest.approx(0.52), "seed_2": pytest.approx(0.62)}  # no mean
    assert scoring.interval_kind(2, ST) == "test"
    assert scoring.interval_kind(5, ST.model_copy(update={"resample_seeds": True})) == "seeds+test"
    assert scoring.interval_kind(4, ST.model_copy(update={"resample_seeds": True})) == "test"  # liberal below 5


def test_headline_is_numbers_only():
    report = {"threshold": 0.4, "accuracy": 0.9, "f1": 0.8, "f1_ci": {"low": 0.7, "high": 0.85}, "roc_auc": None,
              "roc_auc_ci": {"low": None, "high": None}, "ece": 0.05, "per_class": {"f1": {"TB": 0.8}},
              "sensitivity": 0.9, "sensitivity_ci": {"low": 0.8, "high": 1.0}, "specificity": 0.7,
              "argmax": {"accuracy": 0.7}}
    assert scoring.headline(report) == {"accuracy": 0.9, "f1": 0.8, "f1_low": 0.7, "f1_high": 0.85, "ece": 0.05,
                                        "sensitivity": 0.9, "sensitivity_low": 0.8, "specificity": 0.7,
                                        "threshold": 0.4}


def test_one_decision_rule_the_headline_is_at_the_operating_threshold():
    """Scores all below 0.5: the argmax calls everything Healthy, the validation threshold (0.12) does not."""
    y_val = np.array([1] * 20 + [0] * 20)
    p_val = binary(np.concatenate([0.1 + np.arange(1, 21) / 100, np.arange(1, 21) / 1000]))
    y = np.array([1] * 10 + [0] * 10)
    p = binary(np.concatenate([np.linspace(0.11, 0.3, 10), np.linspace(0.001, 0.2, 10)]))
    classes = ["Healthy", "TB"]
    r, _ = scoring.seed_report(y, p, y_val, p_val, classes, "TB", "seed_1", evaluate_params(), ST)
    op = r["operating_point"]
    assert r["threshold"] == op["thresholds"]["seed_1"] == pytest.approx(0.12)
    assert "operating threshold" in r["decision"]
    for key in ("sensitivity", "specificity", "accuracy", "f1"):
        assert r[key] == op["test"][key] and r[key + "_ci"] == op["test"][key + "_ci"]
    decided = p[:, 1] >= r["threshold"]
    assert r["confusion_matrix"] == {"Healthy": {"Healthy": int(np.sum(~decided[10:])),
                                                 "TB": int(np.sum(decided[10:]))},
                                     "TB": {"Healthy": int(np.sum(~decided[:10])), "TB": int(np.sum(decided[:10]))}}
    assert r["argmax"]["sensitivity"] == 0 and r["argmax"]["confusion_matrix"]["TB"] == {"Healthy": 10, "TB": 0}
    assert r["sensitivity"] == 0.9 and "roc_auc" not in r["argmax"]
    other, _ = scoring.seed_report(y, binary(np.clip(p[:, 1] + 0.05, 0, 1)), y_val, p_val, classes, "TB",
                                   "seed_2", evaluate_params(), ST)
    mean = scoring.seeds_report(y, [p, binary(np.clip(p[:, 1] + 0.05, 0, 1))], y_val, [p_val, p_val], [r, other],
                                ["seed_1", "seed_2"], classes, "TB", evaluate_params(), ST)
    assert mean["sensitivity"] == pytest.approx((r["sensitivity"] + other["sensitivity"]) / 2)
    assert mean["sensitivity_ci"] == mean["operating_point"]["test"]["sensitivity_ci"]  # the same rule
    assert mean["argmax"]["sensitivity_ci"]["high"] < mean["sensitivity_ci"]["low"]
    assert mean["threshold"] is None and "threshold" not in scoring.headline(mean)


def test_probabilities_survive_a_write_and_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([0.05, 0.05], 500).astype(np.float32)  # confident: many values near 0 and 1
    probs[0] = [np.float32(1e-9), np.float32(1 - 1e-9)]
    write_rows(tmp_path / "p.csv", ["a", "b"], [[exact(v) for v in row] for row in probs])
    with open(tmp_path / "p.csv", newline="") as f:
        back = np.array([[float(r["a"]), float(r["b"])] for r in csv.DictReader(f)])
    assert np.array_equal(back, probs.astype(np.float64))
    six = np.array([[float(f"{v:.6f}") for v in row] for row in probs])  # the old format lost them
    assert not np.array_equal(six, probs.astype(np.float64))


def scored(name: str, probs: dict[str, np.ndarray], seeds: list[int] | None = None):
    from cxrlab.evaluation.compare import Scored

    s = object.__new__(Scored)  # what Scored reads from predictions.csv, without the files
    s.name, s.probs, s.seeds = name, probs, seeds
    return s


def test_compare_refuses_differing_seed_lists_and_formats_the_p_floor():
    from cxrlab.errors import UserError
    from cxrlab.evaluation import compare

    p = np.full((4, 2), 0.5)
    ref = scored("baseline", {"1": p, "2": p})
    compare.check_seeds(ref, scored("dropout", {"1": p, "2": p}), False)
    with pytest.raises(UserError, match=r"variant dropout has seeds \[1, 3\] but the reference baseline has \[1, 2\]"):
        compare.check_seeds(ref, scored("dropout", {"1": p, "3": p}), False)
    with pytest.raises(UserError, match=r"ensemble both has seeds \[1\] but the reference baseline has \[1, 2\]"):
        compare.check_seeds(ref, scored("both", {"1": p}, seeds=[1]), True)
    floor = 1 / 1501  # the permutation floor at B = 1,500
    r = {"p_value": floor, "p_holm": 5 * floor, "p_at_floor": True, "significant": True}
    assert compare._fmt_p(r, floor) == "< 0.00067 (≤ 0.00333) *"


# ---------------------------------------------------------------- issue 27: exact bounds, rules, labels
def test_12_of_12_test_positives_at_the_operating_point_are_inconclusive_not_met():
    y_val, p_val = validation(20)
    y_test = np.array([1] * 12 + [0] * 12)
    p_test = binary(np.where(y_test == 1, 0.9, 0.1))  # every test image right at the threshold 0.52
    op = scoring.operating_point(y_val, [p_val], y_test, [p_test], ["seed_1"], ["Healthy", "TB"], "TB",
                                 evaluate_params(), ST)
    assert op["test"]["sensitivity"] == 1.0 and op["meets_target"] is True  # the point estimates clear it
    assert op["test"]["sensitivity_ci"]["low"] == pytest.approx(0.7354, abs=1e-4)  # exact, not [1, 1]
    assert op["verdict_by_metric"]["sensitivity"] == "inconclusive" and op["verdict"] == "inconclusive"
    assert "falls short of 0.9 with probability" in op["rule"]
    assert op["shortfall_probability"] == pytest.approx(0.3917, abs=1e-4)  # n = 20, k = 2: P(Bin(20, .1) < 2)


def test_tolerance_rule_needs_29_positives_and_shows_its_cost_in_specificity():
    ev = evaluate_params(threshold_rule="tolerance")
    y_val, p_val = validation(20)
    op = scoring.operating_point(y_val, [p_val], y_val, [p_val], ["seed_1"], ["Healthy", "TB"], "TB", ev, ST)
    assert op["thresholds"] is None and "the tolerance threshold rule needs at least 29" in op["message"]
    # 40 positives scoring 0.51..0.90, 40 negatives 0.01..0.40 on validation; test negatives overlap them
    y_val, p_val = validation(40, 40)
    y_test = np.array([1] * 20 + [0] * 20)
    p_test = binary(np.concatenate([np.linspace(0.55, 0.95, 20), [0.505] * 10 + [0.53] * 10]))
    op = scoring.operating_point(y_val, [p_val], y_test, [p_test], ["seed_1"], ["Healthy", "TB"], "TB", ev, ST)
    # k = 1 (P(Bin(40, .1) >= 2) = 0.92 < 0.95) against the expected rule's k = floor(0.1 x 41) = 4
    assert op["thresholds"] == {"seed_1": pytest.approx(0.51)}
    assert op["expected_rule"]["thresholds"] == {"seed_1": pytest.approx(0.54)}
    assert op["test"]["specificity"] == 0.5 and op["expected_rule"]["test_specificity"] == 1.0
    assert op["specificity_cost"] == 0.5
    assert op["shortfall_probability"] == pytest.approx(0.9 ** 40)  # P(Bin(40, .1) < 1)
    assert "with probability 0.95" in op["rule"]
    assert op["verdict_by_metric"] == {"sensitivity": "inconclusive", "specificity": "inconclusive"}  # 10/20


def report_of(y, prob, y_val, prob_val, kind: str, st=ST) -> dict:
    r, _ = scoring.seed_report(y, prob, y_val, prob_val, ["Healthy", "TB"], "TB", "seed_1", evaluate_params(), st)
    return {"seeds": [1], "interval_kind": kind, "intervals": scoring.INTERVALS[kind],
            "best": {"epoch": 3, **r}, "last": {"epoch": 4, **r}}


def test_summary_rows_say_what_their_own_intervals_cover_and_show_the_verdict_and_ece_reference():
    from cxrlab.reports.plots import summary_table

    y_val, p_val = validation(20)
    y = np.array([1] * 12 + [0] * 12)
    prob = binary(np.where(y == 1, 0.9, 0.1))
    evals = {"baseline": report_of(y, prob, y_val, p_val, "seeds+test"),
             "both": report_of(y, prob, y_val, p_val, "test")}  # an ensemble: test sampling only
    assert evals["both"]["best"]["sensitivity_ci"]["low"] == pytest.approx(0.7354, abs=1e-4)
    assert evals["both"]["best"]["ece_ci"] == pytest.approx({"low": 0.1, "high": 0.1})  # always 0.9, always right
    text = summary_table(["baseline", "both"], evals, {}, {"variants": {}, "units": ""}, ["Healthy", "TB"], "TB",
                         "", 0.95)
    rows = [line for line in text.splitlines() if line.startswith(("| baseline |", "| both |"))]
    assert len(rows) == 8  # best, last, best at the argmax and operating point, per model
    assert all(r.endswith("| seeds + test sampling |") for r in rows if r.startswith("| baseline |"))
    assert all(r.endswith("| test sampling |") for r in rows if r.startswith("| both |"))
    assert "exact (Clopper-Pearson) for accuracy, sensitivity and specificity" in text
    assert "| inconclusive |" in text and "met at CI low" not in text
    assert "(calibrated: 0.0508)" in text and "| 0.9048 (0.39) |" in text  # expected 1 - 2/21 and P(short)


def test_the_page_shows_the_interval_verdict_and_which_intervals_are_exact(tmp_path, monkeypatch):
    from pathlib import Path

    from cxrlab.config.load import load_params
    from cxrlab.io.fsio import write_json
    from cxrlab.serving.webapp import metrics_table

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    y_val, p_val = validation(20)
    y = np.array([1] * 12 + [0] * 12)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics/evaluate/baseline").mkdir(parents=True)
    write_json(tmp_path / "metrics/evaluate/baseline/report.json",
               report_of(y, binary(np.where(y == 1, 0.9, 0.1)), y_val, p_val, "test"))
    table = metrics_table("baseline", params)
    assert "| test metric (best checkpoint, at the operating threshold) |" in table
    assert "| Sensitivity | 1.000 | [0.735, 1.000] |" in table  # the headline is the operating point's
    assert "| WHO TPP, CXR triage test for TB (sensitivity >= 0.9, specificity >= 0.7) | inconclusive |" in table
    assert "exact (Clopper-Pearson) for accuracy, sensitivity, specificity and precision" in table


def test_compare_marks_an_interval_that_disagrees_with_its_test():
    from cxrlab.evaluation import compare

    r = {"difference": 0.1, "low": 0.01, "high": 0.2, "p_value": 0.3}  # interval excludes 0, p does not reject
    assert compare.agrees(r, 0.05) is False
    assert compare._fmt_diff("f1", {**r, "interval_agrees": False}) == "+0.1000 [+0.0100, +0.2000] †"
    assert compare.agrees({**r, "p_value": 0.01}, 0.05) is True and compare.agrees({**r, "low": -0.1}, 0.05) is True
    assert compare.agrees({**r, "p_value": None}, 0.05) is None
