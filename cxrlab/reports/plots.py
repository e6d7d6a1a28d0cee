"""Stage `plots`: compare the variants in figures, a table, and DVC plot data.

Reads every variant's training logs, test metrics, predictions, calibration
bins, the paired comparisons and the FLOPs, and writes:
- `plots/training_curves.png`, `plots/test_metrics.png` (with the 95 %
  intervals as error bars), `plots/confusion_matrices.png`,
  `plots/roc_curves.png`, `plots/reliability.png`;
- `plots/summary.md`: the study's table (variant, epoch, accuracy, F1,
  confusion matrix, parameters, GFLOPs) with intervals (saying what they
  cover), for the best-on-validation epoch, the last epoch and the study's
  own test-picked epoch; the operating point (each seed's threshold, the
  validation evidence, the screening target of params) and calibration; the
  paired comparisons. It reads the report JSON files, not the headline
  metrics files;
- `plots/data/curves.csv` and `plots/data/roc.csv`: one row per variant and
  point, drawn by the top-level `plots:` of dvc.yaml (colour = variant).

Ensembles appear after the variants wherever test results are shown; they
have no training curves, single epoch, FLOPs or study protocol ("–").
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.errors import UserError
from cxrlab.io.fsio import atomic_dir, read_json
from cxrlab.io.records import read_rows
from cxrlab.reports import figures
from cxrlab.reports.external_table import external_reports, external_section

# The published results (test-picked epoch), shown beside ours on TBX11K's test set.
STUDY_PUBLISHED = {
    "baseline": (0.9891, 0.9686),
    "regu_penalty": (0.9924, 0.9781),
    "dropout": (0.9924, 0.9783),
    "sharpness": (0.9902, 0.9718),
    "contrast": (0.9913, 0.9750),
}
STUDY_TEST_SIZE = 920
HEADLINE = ("accuracy", "sensitivity", "specificity", "f1", "roc_auc")
CURVE_COLUMNS = {"train/loss": "train_loss", "train/accuracy": "train_accuracy", "train/f1": "train_f1",
                 "val/loss": "val_loss", "val/accuracy": "val_accuracy", "val/f1": "val_f1",
                 "test_curve/accuracy": "test_curve_accuracy", "test_curve/f1": "test_curve_f1",
                 "images_per_s": "images_per_s"}


def read_curves(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """DVCLive's per-metric TSVs -> {metric: [(epoch, value), ...]} (epochs from 1)."""
    folder = log_dir / "plots" / "metrics"
    curves = {}
    for tsv in sorted(folder.rglob("*.tsv")):
        metric = tsv.relative_to(folder).with_suffix("").as_posix()
        with open(tsv, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        column = Path(metric).name
        curves[metric] = [(int(r["step"]) + 1, float(r[column])) for r in rows]
    return curves


def mean_curves(runs: list[dict[str, list[tuple[int, float]]]]) -> dict[str, list[tuple[int, float]]]:
    """The mean over runs (seeds, and folds with data.folds) of each metric, per epoch."""
    merged: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for metric, points in run.items():
            for epoch, value in points:
                merged.setdefault(metric, {}).setdefault(epoch, []).append(value)
    return {m: [(e, float(np.mean(v))) for e, v in sorted(by_epoch.items())] for m, by_epoch in merged.items()}


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise UserError(f"{path} does not exist; run the {stage} stage first (dvc repro)")
    return path


def confusion_text(cm: dict, classes: list[str]) -> str:
    def count(x):
        return str(int(x)) if float(x).is_integer() else f"{x:.1f}"
    return "[" + " ".join("[" + " ".join(count(cm[t][p]) for p in classes) + "]" for t in classes) + "]"


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def with_ci(m: dict, key: str, digits: int = 4) -> str:
    """`0.9891 [0.9815, 0.9946]`, with `± sd` across seeds when there are several."""
    text = _fmt(m.get(key), digits)
    if m.get(key + "_sd") is not None:
        text += f" ± {m[key + '_sd']:.{digits}f}"
    ci = m.get(key + "_ci")
    if ci and ci.get("low") is not None:
        text += f" [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"
    return text


def epochs_text(report: dict, which: str) -> str:
    """The epoch of each seed's checkpoint (with data.folds each fold model's, f0/f1/...); "–" for an ensemble."""
    cv = report.get("cross_validation")
    if cv:
        return ", ".join("/".join(str(r["epoch"]) for r in s[which]["per_fold"].values())
                         for s in cv["per_seed"].values())
    if "per_seed" in report:
        return ", ".join(str(r[which]["epoch"]) for r in report["per_seed"].values())
    epoch = report[which]["epoch"]
    return "–" if epoch is None else str(epoch)


def _op_row(v: str, report: dict) -> str:
    """One variant's row of the operating-point table."""
    best = report["best"]
    op = best.get("operating_point")
    ece = with_ci(best, "ece")
    if best.get("ece_calibrated") is not None:
        ece += f" (calibrated: {best['ece_calibrated']:.4f})"
    if not op or not op.get("thresholds"):
        return (f"| {v} | n/a | {op['validation_positives'] if op else 'n/a'} | n/a | n/a | n/a | n/a | n/a | {ece} "
                f"| {kind_label(report)} |")
    thresholds = ", ".join(f"{t:.4f}" for t in op["thresholds"].values())
    val = op["validation"]
    val_text = _fmt(val["sensitivity"])
    if val.get("sensitivity_ci"):
        val_text += f" [{_fmt(val['sensitivity_ci']['low'])}, {_fmt(val['sensitivity_ci']['high'])}]"
    verdict = op.get("verdict", "–") if op.get("target") else "–"
    expected = f"{_fmt(op['expected_sensitivity'])} ({_fmt(op.get('shortfall_probability'), 2)})"
    if op.get("specificity_cost") is not None:
        verdict += f"; specificity cost vs expected rule {op['specificity_cost']:+.4f}"
    return (f"| {v} | {thresholds} | {op['validation_positives']} | {val_text} | {expected} "
            f"| {with_ci(op['test'], 'sensitivity')} | {with_ci(op['test'], 'specificity')} | {verdict} | {ece} "
            f"| {kind_label(report)} |")


# Short per-row labels of what a report's intervals cover (scoring.INTERVALS' keys).
KIND_LABELS = {"test": "test sampling", "seeds+test": "seeds + test sampling"}


def kind_label(report: dict) -> str:
    """What this model's intervals cover, for its own row (an ensemble's are test sampling only)."""
    kind = report.get("interval_kind")
    return KIND_LABELS.get(kind, report.get("intervals", "test sampling").split(":")[0])


def rule_sentence(op: dict) -> str:
    """The threshold rule stated whole (docs/statistics.md)."""
    if op.get("threshold_rule") == "tolerance":
        return ("each seed's threshold is the k-th lowest score of the n validation positives, k the largest "
                "with P(Binomial(n, 1 - target) >= k) >= 0.95, so the sensitivity on new images reaches the "
                "target with probability 0.95; the cost is specificity (shown beside the verdict).")
    return ("each seed's threshold is the k-th lowest score of the n validation positives, "
            "k = floor((1 - target) x (n + 1)), so its EXPECTED sensitivity on new images, 1 - k / (n + 1), is "
            "at least the target, yet 35-47 % of runs fall short of it (evaluate.threshold_rule: tolerance "
            "guarantees it with probability 0.95). Picking the best epoch on the same validation images lowers "
            "the expectation a little (docs/statistics.md).")


def operating_point_section(variants: list[str], evals: dict) -> list[str]:
    """The operating-point table: each seed's threshold, the validation evidence, the test result."""
    ops = [evals[v]["best"].get("operating_point") for v in variants]
    op0 = next((o for o in ops if o), None)
    if op0 is None:
        return []
    target = next((o["target_text"] + ". " for o in ops if o and o.get("target_text")), "")
    target = target[0].upper() + target[1:] if target else ""
    lines = ["", f"## Operating point: threshold chosen on validation for sensitivity ≥ {op0['target_sensitivity']}",
             "",
             (f"Rule: {rule_sentence(op0)} Thresholds are listed per seed (each seed decides at its own); "
              "the validation sensitivity of one seed has its exact (Clopper-Pearson) interval; 'expected' is "
              "the rule's expected test sensitivity, in brackets the probability that a run's true sensitivity "
              f"falls short of the target. {target}The target verdict reads the exact intervals of the test "
              "sensitivity and specificity: met when both lower bounds reach the target, not met when an upper "
              "bound is below it, else inconclusive. ECE: expected calibration error of the top-label "
              "confidence with its bootstrap interval; 'calibrated': the mean ECE a perfectly calibrated model "
              "with the same confidences shows on this many images (ECE is biased upwards on few images)."),
             "",
             ("| variant | threshold(s) | val. positives | val. sensitivity | expected (P short) | test sensitivity "
              "| test specificity | target | ECE | intervals |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_op_row(v, evals[v]) for v in variants]
    notes = [f"- {v}: {op[key]}" for v, op in zip(variants, ops) if op for key in ("message", "warning")
             if op.get(key)]
    if notes:
        lines += ["", *notes]
    return lines


FOLD_SPREAD = ("accuracy", "f1", "sensitivity", "specificity", "roc_auc")


def _spread_cell(s: dict | None) -> str:
    if not s:
        return "n/a"
    sd = f" ± {s['sd']:.4f}" if s.get("sd") is not None else ""
    return f"{s['mean']:.4f}{sd} [{s['min']:.4f}, {s['max']:.4f}]"


def fold_spread_section(variants: list[str], evals: dict) -> list[str]:
    """With data.folds: each fold model's validation metrics on its held-out fold, as mean ± sd [min, max]
    across folds (per seed), from report.json's `cross_validation`."""
    rows = []
    for v in variants:
        cv = evals[v].get("cross_validation")
        for seed, by_which in (cv["per_seed"].items() if cv else []):
            spread = by_which["best"]["spread"]
            rows.append(f"| {v} | {seed} | {len(by_which['best']['per_fold'])} | "
                        + " | ".join(_spread_cell(spread.get(k)) for k in FOLD_SPREAD)
                        + " |")
    if not rows:
        return []
    return ["", "## Cross-validation: spread across the fold models (validation, best epochs)", "",
            ("Each fold model on the fold it held out, at the argmax: mean ± sd (ddof 1) [min, max] across folds. "
             "These show how much the choice of held-out images moves the numbers; they are validation, not "
             "test, numbers. The test metrics above are of the mean of the fold models (docs/cross-validation.md)."),
            "", "| variant | seed | folds | accuracy | F1 | sensitivity | specificity | ROC AUC |",
            "|---|---|---|---|---|---|---|---|", *rows]


def summary_table(variants, evals, trains, flops, classes, positive, comparison_md: str, level: float) -> str:
    first = evals[variants[0]]
    n_test = first["best"]["n"]
    seeds = first["seeds"]
    show_published = n_test == STUDY_TEST_SIZE
    spread = f"mean ± sd over seeds {seeds}, then the {level:.0%} interval" if len(seeds) > 1 else \
        f"the {level:.0%} interval in brackets"
    methods = ("intervals: exact (Clopper-Pearson) for accuracy, sensitivity and specificity, percentile "
               "bootstrap for F1 and ROC AUC; the last column says what each row's intervals cover")
    lines = [
        "# Results",
        "",
        (f"Test set: {n_test} images. F1, sensitivity and specificity are those of **{positive}**. Every "
         "model decides at its operating threshold (chosen on validation, each seed its own: see the operating "
         "point below), the rule predict, the page and the Grad-CAM gallery use; a model without one at the "
         "argmax (0.5), which the table \"at the argmax\" shows for every model, for reference. "
         f"{spread[0].upper() + spread[1:]}; {methods}. Confusion matrices: rows are "
         f"the true class and columns the predicted class, both in the order {', '.join(classes)} (for two "
         "classes with the second positive: [[TN FP] [FN TP]])."),
        "",
        "## Best epoch on validation (headline: no test-set leakage)",
        "",
        ("| variant | epoch | accuracy | F1 | sensitivity | specificity | ROC AUC | confusion | parameters | GFLOPs "
         "| intervals |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        m, f = evals[v]["best"], flops["variants"].get(v)
        lines.append(
            f"| {v} | {epochs_text(evals[v], 'best')} | {with_ci(m, 'accuracy')} | {with_ci(m, 'f1')} | "
            f"{with_ci(m, 'sensitivity')} | {with_ci(m, 'specificity')} | {with_ci(m, 'roc_auc')} | "
            f"{confusion_text(m['confusion_matrix'], classes)} | "
            + (f"{f.get('parameters', 0):,} | {_fmt(f.get('gflops'), 2)} |" if f is not None else "– | – |")
            + f" {kind_label(evals[v])} |")
    lines += ["", "## Last epoch", "",
              "| variant | epoch | accuracy | F1 | sensitivity | specificity | ROC AUC | confusion | intervals |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        m = evals[v]["last"]
        lines.append(
            f"| {v} | {epochs_text(evals[v], 'last')} | {with_ci(m, 'accuracy')} | {with_ci(m, 'f1')} | "
            f"{with_ci(m, 'sensitivity')} | {with_ci(m, 'specificity')} | {with_ci(m, 'roc_auc')} | "
            f"{confusion_text(m['confusion_matrix'], classes)} | {kind_label(evals[v])} |")

    lines += ["", "## Best epoch at the argmax (0.5) decision (secondary: not the models' decision rule)", "",
              "| variant | accuracy | F1 | sensitivity | specificity | confusion | intervals |",
              "|---|---|---|---|---|---|---|"]
    for v in variants:
        m = evals[v]["best"].get("argmax") or evals[v]["best"]
        lines.append(f"| {v} | {with_ci(m, 'accuracy')} | {with_ci(m, 'f1')} | {with_ci(m, 'sensitivity')} | "
                     f"{with_ci(m, 'specificity')} | {confusion_text(m['confusion_matrix'], classes)} | "
                     f"{kind_label(evals[v])} |")

    lines += operating_point_section(variants, evals)
    lines += fold_spread_section(variants, evals)
    studies = {v: [r.get("study_protocol") for s in trains[v]["seeds"].values()  # each run: a seed, or seed x fold
                   for r in (s["folds"].values() if "folds" in s else [s])] for v in variants if v in trains}
    if any(all(s) for s in studies.values()):
        header = "| variant | epoch | accuracy | F1 | confusion |"
        rule = "|---|---|---|---|---|"
        if show_published:
            header += " published accuracy | published F1 |"
            rule += "---|---|"
        lines += ["", "## The study's protocol: epoch picked by test F1 (leaks the test set; comparison only)",
                  "", header, rule]
        for v, runs in studies.items():
            if not all(runs):
                continue
            line = (f"| {v} | {', '.join(str(s['epoch']) for s in runs)} | "
                    f"{_fmt(np.mean([s['test_accuracy'] for s in runs]))} | "
                    f"{_fmt(np.mean([s['test_f1'] for s in runs]))} | "
                    f"{confusion_text(runs[0]['confusion_matrix'], classes)} |")
            if show_published:
                pub = STUDY_PUBLISHED.get(v)
                line += f" {_fmt(pub[0]) if pub else '–'} | {_fmt(pub[1]) if pub else '–'} |"
            lines.append(line)
    lines += ["", f"FLOPs: {flops.get('units', '')}.", ""]
    if comparison_md:
        lines += ["#" + comparison_md]  # one heading level down
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_plots(params: Params) -> None:
    variants = list(params.variants)
    stage_of = {v: f"evaluate@{v}" for v in variants} | {e: f"ensemble@{e}" for e in params.ensembles}
    scored = list(stage_of)  # the variants, then the ensembles
    positive = params.data.positive_class

    evals = {v: read_json(_require(paths.eval_dir(v) / "report.json", stage_of[v])) for v in scored}
    trains = {v: read_json(_require(paths.train_dir(v) / "report.json", f"train@{v}")) for v in variants}
    curves = {v: mean_curves([read_curves(log) for s in evals[v]["seeds"] for log in paths.run_logs(v, s)])
              for v in variants}  # with data.folds, the mean over seeds and folds
    flops = read_json(_require(paths.FLOPS_REPORT, "flops"))
    comparison_md = _require(paths.COMPARISON_TABLE, "compare").read_text()
    classes = list(evals[variants[0]]["best"]["confusion_matrix"])

    rocs, reliability = {}, {}
    points: dict[str, tuple[float, float]] = {}  # each model's operating point on its (first seed's) ROC
    for v in scored:
        rows = read_rows(_require(paths.eval_dir(v) / "predictions.csv", stage_of[v]), stage_of[v])
        first_seed = rows[0]["seed"]
        rows = [r for r in rows if r["seed"] == first_seed]
        y = np.array([r["class"] == positive for r in rows])
        score = np.array([float(r[f"best_prob_{positive}"]) for r in rows])
        per_seed = evals[v].get("per_seed")
        if y.any() and not y.all():
            fpr, tpr, _ = roc_curve(y, score)
            auc = per_seed[f"seed_{first_seed}"]["best"]["roc_auc"] if per_seed else evals[v]["best"]["roc_auc"]
            rocs[v] = (fpr, tpr, auc)
            first = per_seed[f"seed_{first_seed}"]["best"] if per_seed else evals[v]["best"]
            if first.get("threshold") is not None:
                points[v] = (1 - first["specificity"], first["sensitivity"])
        bins = read_rows(paths.eval_dir(v) / "calibration.csv", stage_of[v])
        # the ECE printed beside a seed's bins is that seed's, not the mean over seeds
        ece = per_seed[f"seed_{first_seed}"]["best"]["ece"] if per_seed else evals[v]["best"]["ece"]
        label = f"{v} (seed {first_seed})" if per_seed else v
        reliability[label] = ([b for b in bins if b["seed"] == first_seed], ece)

    with atomic_dir(paths.PLOTS) as out:
        best_epoch = {v: evals[v]["best"]["epoch"] for v in variants}
        figures.training_curves(curves, best_epoch, out / "training_curves.png")
        figures.metric_bars(
            {v: {m: evals[v]["best"][m] for m in HEADLINE} for v in scored}, out / "test_metrics.png",
            f"Test metrics, best epoch on validation, at the operating threshold (argmax where none; "
            f"{positive} positive; bars: {params.stats.ci_level:.0%} intervals, exact for proportions)",
            {v: {m: (evals[v]["best"][m + "_ci"]["low"], evals[v]["best"][m + "_ci"]["high"]) for m in HEADLINE
                 if evals[v]["best"].get(m + "_ci", {}).get("low") is not None} for v in scored})
        figures.confusion_matrices(
            {v: [[evals[v]["best"]["confusion_matrix"][t][p] for p in classes] for t in classes] for v in scored},
            classes, out / "confusion_matrices.png",
            {v: f"epoch {epochs_text(evals[v], 'best')}, acc {evals[v]['best']['accuracy']:.4f}" for v in scored},
            "Test confusion matrices (best epoch on validation; first seed; at the operating threshold, "
            "the argmax where none)" if any(len(evals[v]["seeds"]) > 1 for v in scored) else
            "Test confusion matrices (best epoch on validation; at the operating threshold, the argmax where none)")
        if rocs:
            figures.roc_curves(rocs, positive, out / "roc_curves.png", points)
        figures.reliability(reliability, out / "reliability.png")
        external = external_section(external_reports(params.external, scored), params.stats.ci_level)
        (out / "summary.md").write_text(summary_table(scored, evals, trains, flops, classes, positive,
                                                      comparison_md, params.stats.ci_level)
                                        + "".join(line + "\n" for line in external))

        (out / "data").mkdir()
        epochs_rows = []
        for v in variants:
            by_epoch: dict[int, dict] = {}
            for metric, column in CURVE_COLUMNS.items():
                for epoch, value in curves[v].get(metric, []):
                    by_epoch.setdefault(epoch, {})[column] = value
            for epoch in sorted(by_epoch):
                epochs_rows.append([v, epoch] + [by_epoch[epoch].get(c, "") for c in CURVE_COLUMNS.values()])
        write_csv(out / "data" / "curves.csv", ["variant", "epoch", *CURVE_COLUMNS.values()], epochs_rows)
    print(f"plots: figures, summary.md and plot data in {paths.PLOTS}/")
    print((paths.PLOTS / "summary.md").read_text())

