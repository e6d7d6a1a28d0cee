"""Stage `evaluate@<variant>`: score the best and last checkpoints of every seed on the test set.

Writes to `metrics/evaluate/<variant>/`:
- `metrics.json`: `{<variant>: headline}`, the numbers of the best checkpoint
  for `dvc exp show` (`scoring.HEADLINE`: accuracy, F1, sensitivity, specificity at
  the operating threshold (the argmax without one), ROC AUC, ECE, the 95 %
  bounds of F1 and ROC AUC, the lower bound of sensitivity, and the threshold);
  numbers only;
- `report.json`: everything: for `best` (the epoch chosen on validation) and `last`,
  `operating_point`: the threshold chosen on validation for
  `evaluate.target_sensitivity` by `evaluate.threshold_rule` (each seed's
  own), the test sensitivity and specificity there (with intervals) and the
  verdict on the screening target of `evaluate.screening` (met / not met /
  inconclusive from the intervals); at that threshold (the one decision rule
  of every output: predict, the page, explain, the figures; the argmax (0.5)
  where validation gives none): accuracy, the positive class's F1,
  sensitivity, specificity and precision, macro averages, each with its
  interval beside it (`accuracy_ci`: exact Clopper-Pearson for the
  proportions, bootstrap for the rest, `interval_methods`); per-class values
  keyed by class name; the confusion matrix {true: {predicted: count}}; ROC
  AUC; the expected calibration error with its interval and the ECE of a
  perfectly calibrated model (`ece_calibrated`); and under `argmax` the same
  decision metrics at the argmax (0.5), a secondary view. With several
  seeds: the mean over seeds, `_sd` across seeds, and each seed's own report
  under `per_seed`; `intervals` says what the intervals cover;
- `predictions.csv`: per seed and test image, each checkpoint's class
  probabilities (exact: they read back bit for bit), its argmax
  (`<which>_predicted`), its operating threshold and its decision there
  (`<which>_threshold`, `<which>_decision`: the argmax without a threshold);
- `calibration.csv`: the reliability bins of each seed's best checkpoint;
- `val_predictions.csv`: per seed and validation image, each checkpoint's
  class probabilities: the images the operating threshold is chosen on (the
  hold-out; with `data.folds` every training image, out of fold, the column
  `fold` naming the model that held it out);
- `plots/sklearn/`: DVCLive's confusion matrix (at the operating threshold),
  ROC and precision-recall of the first seed's best checkpoint.

With `data.folds: k` a seed's test probabilities are the mean of its k
fold models' and its validation set is the pooled out-of-fold predictions;
`cross_validation` in report.json (not the headline) holds each fold's validation metrics and
their spread (cxrlab.evaluation.folds).

The ensemble stage reuses the loading and prediction helpers and
`report_and_write`, so an ensemble's outputs are a variant's.
"""

from __future__ import annotations

import csv
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from torch.utils.data import DataLoader

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.data.datasets import Split, eval_batch_size, prepared_image_size
from cxrlab.errors import UserError
from cxrlab.evaluation import stats
from cxrlab.evaluation.folds import ScoringData, describe, fold_loaders, fold_report, pool_out_of_fold, scoring_data
from cxrlab.evaluation.metrics import decide
from cxrlab.evaluation.scoring import (
    INTERVALS,
    MIN_SEEDS_TO_RESAMPLE,
    headline,
    interval_kind,
    seed_report,
    seeds_report,
)
from cxrlab.io.fsio import atomic_file, check_writable, write_json
from cxrlab.model.backbones import load_checkpoint, model_from_checkpoint
from cxrlab.training.engine import predict
from cxrlab.training.runtime import Runtime, setup

CHECKPOINTS = ("best", "last")

# Checkpoint kind (best, last) -> run (a seed; the ensemble's one run) -> its value.
ByRun = dict[str, dict[Hashable, np.ndarray]]


def load_for_test(path, classes: list[str], image_size: int) -> dict:
    """A checkpoint that fits the test data: same classes, same image size."""
    ckpt = load_checkpoint(path)
    if ckpt["classes"] != classes:
        raise UserError(f"{path} was trained for classes {ckpt['classes']} but the test set has {classes}; "
                        "retrain it (dvc repro)")
    if ckpt["image_size"] != image_size:
        raise UserError(f"{path} was trained on {ckpt['image_size']} px images but the prepared data is "
                        f"{image_size} px; retrain it (dvc repro)")
    return ckpt


def write_rows(path, header: list[str], rows: list[list]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def runtime(params: Params) -> Runtime:
    """The device (`runtime`) and the memory format and determinism of `train`, shared with training; never
    mixed precision (evaluation is float32 on every device, so `train.amp` is not a param of evaluate)."""
    run = params.train
    return setup(params.runtime.device, False, run.channels_last, run.deterministic)


def predict_checkpoint(path: Path, classes: list[str], image_size: int, rt: Runtime,
                       loaders: dict[str, DataLoader], desc: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """A checkpoint's class probabilities on the test and the validation images (None without), and its epoch."""
    ckpt = load_for_test(path, classes, image_size)
    model = model_from_checkpoint(ckpt, path).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    norm = (ckpt["mean"], ckpt["std"])
    test = predict(model, loaders["test"], rt, *norm, desc=desc)[0]
    val = predict(model, loaders["val"], rt, *norm)[0] if "val" in loaders else None
    return test, val, int(ckpt["epoch"])


def predict_seed(variant: str, seed: int, which: str, data: ScoringData, image_size: int, rt: Runtime,
                 positive: str) -> tuple[np.ndarray, np.ndarray | None, int | None, dict | None]:
    """One seed's `which` checkpoint(s): test probabilities, validation probabilities (None without), epoch,
    and with folds the per-fold report. With folds the test probabilities are the mean of the fold models',
    the validation ones each training image's out-of-fold prediction, and the epoch None (one per fold)."""
    runs = [predict_checkpoint(paths.checkpoint(variant, seed, which, fold), data.test.classes, image_size, rt,
                               fold_loaders(data, fold),
                               f"test {variant} seed {seed} {which}" + (f" fold_{fold}" if fold is not None else ""))
            for fold in data.folds]
    if data.folds == [None]:
        return (*runs[0], None)
    tests, vals, epochs = zip(*runs)
    return (np.mean(tests, axis=0), pool_out_of_fold(data, list(vals)), None,
            fold_report(data, list(vals), list(epochs), positive))


def evaluate_variant(variant: str, params: Params) -> None:
    seeds = params.variant(variant).seeds
    check_writable(paths.eval_dir(variant) / "metrics.json")
    rt = runtime(params)
    data = scoring_data(eval_batch_size(params.evaluate.batch_size, rt.device), rt)
    image_size = prepared_image_size()

    probs: ByRun = {w: {} for w in CHECKPOINTS}
    val_probs: ByRun = {w: {} for w in CHECKPOINTS}
    epochs: dict[str, dict[Hashable, int | None]] = {w: {} for w in CHECKPOINTS}
    per_fold: dict[str, dict] = {}
    for seed in seeds:
        for which in CHECKPOINTS:
            test_prob, val_prob, epoch, folds = predict_seed(variant, seed, which, data, image_size, rt,
                                                             params.data.positive_class)
            probs[which][seed], epochs[which][seed] = test_prob, epoch
            if val_prob is not None:
                val_probs[which][seed] = val_prob
            if folds is not None:
                per_fold.setdefault(f"seed_{seed}", {})[which] = folds
    header: dict = {"seeds": seeds}
    if per_fold:
        header["cross_validation"] = {"folds": len(data.fold_rows), "method": describe(len(data.fold_rows)),
                                      "per_seed": per_fold}
    report_and_write(f"evaluate {variant}", paths.eval_dir(variant), header, seeds,
                     probs, val_probs, epochs, data.test, data.y_val, params)
    write_val_predictions(paths.eval_dir(variant), data, seeds, val_probs)


def write_val_predictions(out: Path, data: ScoringData, seeds: list[Hashable], val_probs: ByRun) -> None:
    """val_predictions.csv: the validation probabilities the operating point was chosen on, per run and image
    (`fold`: the model that held the image out, or `val` for the hold-out). Always written (a DVC output),
    with only its header when there is no validation set."""
    classes = data.test.classes
    columns = ["seed", "filename", "class", "label", "fold"]
    columns += [f"{which}_prob_{c}" for which in CHECKPOINTS for c in classes]
    rows = []
    for seed in seeds if data.val is not None else []:
        for i, r in enumerate(data.val.rows):
            rows.append([seed, r["filename"], r["class"], r["label"], r["subset"]]
                        + [repr(float(v)) for which in CHECKPOINTS for v in val_probs[which][seed][i]])
    write_rows(out / "val_predictions.csv", columns, rows)


def report_and_write(title: str, out: Path, header: dict, seeds: list[Hashable], probs: ByRun, val_probs: ByRun,
                     epochs: dict[str, dict[Hashable, int | None]], test: Split, y_val: np.ndarray | None,
                     params: Params) -> None:
    """Everything after the probabilities: score each run (`seeds`: a variant's seeds, an ensemble's one run)
    and write report.json (`header` first), the headline metrics.json, predictions.csv, calibration.csv and
    the DVCLive plots to `out`; print the headline as `<title> best: ...`."""
    ev, st, positive = params.evaluate, params.stats, params.data.positive_class
    classes, y = test.classes, test.labels
    runs = [f"seed_{s}" for s in seeds]
    kind = interval_kind(len(seeds), st)
    report: dict = {**header,
                    "method": (f"{st.ci_level:.0%} intervals: exact (Clopper-Pearson) for accuracy, sensitivity, "
                               "specificity and precision; percentile bootstrap, "
                               f"{st.resamples} resamples, for F1, ROC AUC, macro averages and ECE; "
                               "headline metrics at each run's operating threshold (`decision`), the argmax "
                               "(0.5) where there is none; `argmax`: at the argmax"
                               + (f", the mean over {len(seeds)} seeds" if len(seeds) > 1 else "")),
                    "intervals": INTERVALS[kind], "interval_kind": kind,
                    "interval_methods": stats.interval_methods(kind == "seeds+test")}
    if st.resample_seeds and kind == "test":
        report["intervals_note"] = (f"stats.resample_seeds needs >= {MIN_SEEDS_TO_RESAMPLE} seeds; "
                                    f"with {len(seeds)} the intervals cover test sampling only")
    per_seed: dict[str, dict] = {r: {} for r in runs}
    bins: dict[Hashable, list[dict]] = {}
    for which in CHECKPOINTS:
        seed_reports = []
        for seed, run in zip(seeds, runs):
            r, b = seed_report(y, probs[which][seed], y_val, val_probs[which].get(seed), classes, positive, run,
                               ev, st)
            r = {"epoch": epochs[which][seed], **r}
            seed_reports.append(r)
            per_seed[run][which] = r
            if which == "best":
                bins[seed] = b
        if len(seeds) == 1:
            report[which] = seed_reports[0]
        else:
            report[which] = seeds_report(y, [probs[which][s] for s in seeds], y_val,
                                         [val_probs[which][s] for s in seeds] if y_val is not None else None,
                                         seed_reports, runs, classes, positive, ev, st)
    if len(seeds) > 1:
        report["per_seed"] = per_seed

    thresholds = {which: {run: per_seed[run][which]["threshold"] for run in runs} for which in CHECKPOINTS}
    out.mkdir(parents=True, exist_ok=True)
    first = probs["best"][seeds[0]].astype(np.float64)  # DVCLive writes JSON: no float32
    pos = classes.index(positive)
    decided = decide(first, pos, thresholds["best"][runs[0]])  # the decision of the headline metrics
    live = Live(str(out), dvcyaml=False, save_dvc_exp=False)
    live.log_sklearn_plot("confusion_matrix", [classes[i] for i in y], [classes[i] for i in decided],
                          name="confusion_matrix.json")
    live.log_sklearn_plot("roc", (y == pos).astype(int), first[:, pos], name="roc.json")
    live.log_sklearn_plot("precision_recall", (y == pos).astype(int), first[:, pos], name="precision_recall.json")
    live.end()

    columns = ["seed", "filename", "class", "label"]
    for which in CHECKPOINTS:
        columns += [f"{which}_prob_{c}" for c in classes] + [f"{which}_predicted"]
    columns += [f"{which}_{c}" for which in CHECKPOINTS for c in ("threshold", "decision")]
    rows = []
    for seed, run in zip(seeds, runs):
        for i, r in enumerate(test.rows):
            line = [seed, r["filename"], r["class"], r["label"]]
            for which in CHECKPOINTS:
                p = probs[which][seed][i]
                line += [exact(v) for v in p] + [classes[int(p.argmax())]]
            for which in CHECKPOINTS:
                threshold = thresholds[which][run]
                line += ["" if threshold is None else exact(threshold),
                         classes[int(decide(probs[which][seed][i], pos, threshold))]]
            rows.append(line)
    write_rows(out / "predictions.csv", columns, rows)
    write_rows(out / "calibration.csv", ["seed", "bin", "low", "high", "count", "confidence", "accuracy"],
               [[s, b["bin"], b["low"], b["high"], b["count"], "" if b["confidence"] is None else b["confidence"],
                 "" if b["accuracy"] is None else b["accuracy"]] for s, table in bins.items() for b in table])
    write_json(out / "report.json", report)
    # keyed by the model's name, so `dvc exp show` names the column `baseline.f1`, not by file and path
    write_json(out / "metrics.json", {out.name: headline(report["best"])})  # after live.end(), which writes one

    for which in CHECKPOINTS:
        print(headline_line(f"{title} {which}", report[which], positive))
    op = report["best"].get("operating_point") or {}
    for key in ("message", "warning"):
        if op.get(key):
            print(f"{title}: {op[key]}")


def exact(value) -> str:
    """A probability or threshold as text that reads back as exactly the same number (shortest repr),
    so compare scores what evaluate scored: six decimals made ties and moved ROC AUC and argmax."""
    return repr(float(value))


def headline_line(title: str, m: dict, positive: str) -> str:
    """One line of the stage output: the decision rule, the headline metrics at it, the screening verdict."""
    ci = m["accuracy_ci"]
    auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a"
    op = m.get("operating_point")
    if op and op.get("thresholds"):
        rule = f"p({positive}) >= " + ", ".join(f"{t:.3f}" for t in op["thresholds"].values())
    else:
        rule = "the argmax"
    line = (f"{title} at {rule}: accuracy {m['accuracy']:.4f} "
            f"[{ci['low']:.4f}, {ci['high']:.4f}], F1({positive}) {m['f1']:.4f}, "
            f"sensitivity {m['sensitivity']:.4f}, specificity {m['specificity']:.4f}, ROC AUC {auc}, "
            f"ECE {m['ece']:.4f}")
    if op and op.get("thresholds") and op.get("target"):
        line += f"; {op['target']['name']}: {op.get('verdict', 'n/a')} (read on the exact intervals)"
    return line
