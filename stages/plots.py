"""Stage `plots`: compare the variants in figures, a table, and DVC plot data.

Reads every variant's training log, test metrics, predictions and FLOPs and writes:
- `plots/training_curves.png`, `plots/test_metrics.png`,
  `plots/confusion_matrices.png`, `plots/roc_curves.png`;
- `plots/summary.md`: the study's table (variant, epoch, accuracy, F1,
  confusion matrix, parameters, GFLOPs) for the best-on-validation epoch,
  the last epoch, and the study's own test-picked epoch;
- `plots/data/curves.csv` and `plots/data/roc.csv`: one row per variant and
  point, drawn by the top-level `plots:` of dvc.yaml (colour = variant).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from stages import figures, paths
from stages.config import load_params
from stages.errors import UserError, run_stage
from stages.fsio import atomic_dir, read_json
from stages.records import read_rows

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


def read_curves(train_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """DVCLive's per-metric TSVs -> {metric: [(epoch, value), ...]} (epochs from 1)."""
    folder = train_dir / "plots" / "metrics"
    curves = {}
    for tsv in sorted(folder.rglob("*.tsv")):
        metric = tsv.relative_to(folder).with_suffix("").as_posix()
        with open(tsv, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        column = Path(metric).name
        curves[metric] = [(int(r["step"]) + 1, float(r[column])) for r in rows]
    return curves


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise UserError(f"{path} does not exist; run the {stage} stage first (dvc repro)")
    return path


def confusion_text(cm: dict, classes: list[str]) -> str:
    return "[" + " ".join("[" + " ".join(str(cm[t][p]) for p in classes) + "]" for t in classes) + "]"


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_table(variants, evals, trains, flops, classes, positive) -> str:
    n_test = next(iter(evals.values()))["best"]["n"]
    show_published = n_test == STUDY_TEST_SIZE
    lines = [
        "# Results",
        "",
        f"Test set: {n_test} images. F1, sensitivity and specificity are those of **{positive}**. "
        f"Confusion matrices: rows are the true class and columns the predicted class, both in the "
        f"order {', '.join(classes)} (for two classes with the second positive: [[TN FP] [FN TP]]).",
        "",
        "## Best epoch on validation (headline: no test-set leakage)",
        "",
        "| variant | epoch | accuracy | F1 | sensitivity | specificity | ROC AUC | confusion | parameters | GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        m, f = evals[v]["best"], flops["variants"].get(v, {})
        lines.append(
            f"| {v} | {m['epoch']} | {_fmt(m['accuracy'])} | {_fmt(m['f1'])} | {_fmt(m['sensitivity'])} | "
            f"{_fmt(m['specificity'])} | {_fmt(m['roc_auc'])} | {confusion_text(m['confusion_matrix'], classes)} | "
            f"{f.get('parameters', 0):,} | {_fmt(f.get('gflops'), 2)} |")
    lines += ["", "## Last epoch", "",
              "| variant | epoch | accuracy | F1 | sensitivity | specificity | ROC AUC | confusion |",
              "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        m = evals[v]["last"]
        lines.append(
            f"| {v} | {m['epoch']} | {_fmt(m['accuracy'])} | {_fmt(m['f1'])} | {_fmt(m['sensitivity'])} | "
            f"{_fmt(m['specificity'])} | {_fmt(m['roc_auc'])} | {confusion_text(m['confusion_matrix'], classes)} |")
    studies = {v: trains[v].get("study_protocol") for v in variants}
    if any(studies.values()):
        header = "| variant | epoch | accuracy | F1 | confusion |"
        rule = "|---|---|---|---|---|"
        if show_published:
            header += " published accuracy | published F1 |"
            rule += "---|---|"
        lines += ["", "## The study's protocol: epoch picked by test F1 (leaks the test set; comparison only)",
                  "", header, rule]
        for v in variants:
            s = studies[v]
            if not s:
                continue
            line = (f"| {v} | {s['epoch']} | {_fmt(s['test_accuracy'])} | {_fmt(s['test_f1'])} | "
                    f"{confusion_text(s['confusion_matrix'], classes)} |")
            if show_published:
                pub = STUDY_PUBLISHED.get(v)
                line += f" {_fmt(pub[0]) if pub else '–'} | {_fmt(pub[1]) if pub else '–'} |"
            lines.append(line)
    lines += ["", f"FLOPs: {flops.get('units', '')}.", ""]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    params = load_params()
    variants = list(params.variants)
    positive = params.data.positive_class

    evals = {v: read_json(_require(paths.eval_dir(v) / "metrics.json", f"evaluate@{v}")) for v in variants}
    trains = {v: read_json(_require(paths.train_dir(v) / "metrics.json", f"train@{v}")) for v in variants}
    curves = {v: read_curves(paths.train_dir(v)) for v in variants}
    flops = read_json(_require(paths.FLOPS, "flops"))
    classes = list(next(iter(evals.values()))["best"]["confusion_matrix"])

    rocs = {}
    for v in variants:
        rows = read_rows(_require(paths.eval_dir(v) / "predictions.csv", f"evaluate@{v}"), f"evaluate@{v}")
        y = np.array([r["class"] == positive for r in rows])
        score = np.array([float(r[f"best_prob_{positive}"]) for r in rows])
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, score)
        rocs[v] = (fpr, tpr, evals[v]["best"]["roc_auc"])

    with atomic_dir(paths.PLOTS) as out:
        best_epoch = {v: evals[v]["best"]["epoch"] for v in variants}
        figures.training_curves(curves, best_epoch, out / "training_curves.png")
        figures.metric_bars({v: {m: evals[v]["best"][m] for m in HEADLINE} for v in variants},
                            out / "test_metrics.png", f"Test metrics (best epoch on validation; {positive} positive)")
        figures.confusion_matrices(
            {v: [[evals[v]["best"]["confusion_matrix"][t][p] for p in classes] for t in classes] for v in variants},
            classes, out / "confusion_matrices.png",
            {v: f"epoch {best_epoch[v]}, acc {evals[v]['best']['accuracy']:.4f}" for v in variants})
        if rocs:
            figures.roc_curves(rocs, positive, out / "roc_curves.png")
        (out / "summary.md").write_text(summary_table(variants, evals, trains, flops, classes, positive))

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
        write_csv(out / "data" / "roc.csv", ["variant", "fpr", "tpr"],
                  [[v, f"{a:.6f}", f"{b:.6f}"] for v, (fpr, tpr, _) in rocs.items() for a, b in zip(fpr, tpr)])
    print(f"plots: figures, summary.md and plot data in {paths.PLOTS}/")
    print((paths.PLOTS / "summary.md").read_text())


if __name__ == "__main__":
    run_stage(main, "plots")
