"""Stage `evaluate@<variant>`: score the best and last checkpoints on the test set.

Writes to `metrics/evaluate/<variant>/`:
- `metrics.json`: for `best` (the epoch chosen on validation) and `last`,
  accuracy, the positive class's F1, sensitivity, specificity and precision,
  ROC AUC, macro averages, per-class values keyed by class name, and the
  confusion matrix {true: {predicted: count}};
- `predictions.csv`: per test image, the class probabilities and prediction
  of each checkpoint;
- `plots/sklearn/`: DVCLive's confusion matrix, ROC and precision-recall of
  the best checkpoint.
"""

from __future__ import annotations

import argparse
import csv
from typing import Sequence

import numpy as np
import torch
from dvclive import Live

from stages import paths
from stages.config import load_params
from stages.datasets import ImageArrayDataset, load_split, make_loader, prepared_image_size
from stages.engine import predict
from stages.errors import UserError, run_stage
from stages.fsio import atomic_file, write_json
from stages.metrics import classification_metrics
from stages.models import load_checkpoint, model_from_checkpoint
from stages.runtime import setup

CHECKPOINTS = ("best", "last")


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


def write_predictions(path, rows: list[dict], classes: list[str], probs: dict[str, np.ndarray]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["filename", "class", "label"]
        for which in probs:
            header += [f"{which}_prob_{c}" for c in classes] + [f"{which}_predicted"]
        writer.writerow(header)
        for i, r in enumerate(rows):
            line = [r["filename"], r["class"], r["label"]]
            for prob in probs.values():
                line += [f"{p:.6f}" for p in prob[i]] + [classes[int(prob[i].argmax())]]
            writer.writerow(line)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", help="a key of `experiments` in params.yaml")
    args = parser.parse_args(argv)
    params = load_params()
    params.variant(args.variant)  # an unknown variant is an error
    run = params.train  # the shared runtime settings: device, precision, determinism
    rt = setup(run.device, run.amp, run.channels_last, run.deterministic)

    test = load_split("test")
    classes = test.classes
    positive = params.data.positive_class
    loader = make_loader(ImageArrayDataset(test), params.evaluate.batch_size, shuffle=False, seed=0,
                         workers=0, device=rt.device)
    image_size = prepared_image_size()

    results, probs = {}, {}
    for which in CHECKPOINTS:
        path = paths.model_dir(args.variant) / f"{which}.pt"
        ckpt = load_for_test(path, classes, image_size)
        model = model_from_checkpoint(ckpt, path).to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        prob, y = predict(model, loader, rt, ckpt["mean"], ckpt["std"], desc=f"evaluate {which}")
        probs[which] = prob
        results[which] = {"epoch": int(ckpt["epoch"]),
                          **classification_metrics(y, prob, classes, positive)}

    out = paths.eval_dir(args.variant)
    out.mkdir(parents=True, exist_ok=True)
    y_true = test.labels
    best = probs["best"].astype(np.float64)  # DVCLive writes JSON: no float32
    live = Live(str(out), dvcyaml=False, save_dvc_exp=False)
    live.log_sklearn_plot("confusion_matrix", [classes[i] for i in y_true],
                          [classes[i] for i in best.argmax(1)], name="confusion_matrix.json")
    pos = classes.index(positive)
    live.log_sklearn_plot("roc", (y_true == pos).astype(int), best[:, pos], name="roc.json")
    live.log_sklearn_plot("precision_recall", (y_true == pos).astype(int), best[:, pos],
                          name="precision_recall.json")
    live.end()
    write_predictions(out / "predictions.csv", test.rows, classes, probs)
    write_json(out / "metrics.json", results)  # after live.end(), which writes an empty one
    for which, m in results.items():
        auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a"
        print(f"evaluate {args.variant} {which} (epoch {m['epoch']}): accuracy {m['accuracy']:.4f}, "
              f"F1({positive}) {m['f1']:.4f}, sensitivity {m['sensitivity']:.4f}, "
              f"specificity {m['specificity']:.4f}, ROC AUC {auc}")


if __name__ == "__main__":
    run_stage(main, "evaluate")
