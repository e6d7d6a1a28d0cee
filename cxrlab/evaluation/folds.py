"""The images evaluate scores, and what k-fold cross-validation (`data.folds`) adds to its report.

Without folds the validation set is the hold-out (`subset=val`). With k folds
it is the whole training part, each image predicted by the one fold model
that did not train on it (out of fold, "OOF"): the operating threshold is
chosen on these pooled predictions, 1 / val_fraction times more positives
than one hold-out has, while each fold model's own validation metrics (on
its fold) show how much the choice of held-out images moves the numbers.
The test probabilities of a seed are the mean of its k fold models'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader

from cxrlab.data.datasets import ImageArrayDataset, LoaderSettings, Split, load_split, make_loader
from cxrlab.evaluation.metrics import classification_metrics
from cxrlab.training.runtime import Runtime

FOLD_METRICS = ("loss", "accuracy", "f1", "sensitivity", "specificity", "roc_auc")


@dataclass
class ScoringData:
    """The test split, the validation split (None without one) and an in-order loader of each.

    With folds, `val` is the whole training part and `loaders` holds `fold_<f>`
    (that fold's images) instead of `val`; `fold_rows[f]` are their positions in `val`.
    """

    test: Split
    val: Split | None
    loaders: dict[str, DataLoader]
    fold_rows: list[np.ndarray]

    @property
    def y_val(self) -> np.ndarray | None:
        return self.val.labels if self.val is not None else None

    @property
    def folds(self) -> list[int | None]:
        """The fold models of a seed: [0, ..., k-1], or [None] (one model) without folds."""
        return list(range(len(self.fold_rows))) or [None]


def scoring_data(batch_size: int, rt: Runtime) -> ScoringData:
    """What evaluate and ensemble score: the test images, and the hold-out or out-of-fold validation images."""
    test, train = load_split("test"), load_split("train")
    settings = LoaderSettings(pin_memory=rt.device.type == "cuda")

    def loader(split: Split) -> DataLoader:
        return make_loader(ImageArrayDataset(split), batch_size, shuffle=False, seed=0, settings=settings)

    loaders = {"test": loader(test)}
    names = train.folds()
    if names:
        subsets = [r["subset"] for r in train.rows]
        fold_rows = [np.flatnonzero([s == name for s in subsets]) for name in names]
        loaders.update({name: loader(train.subset(name)) for name in names})
        return ScoringData(test, train, loaders, fold_rows)
    val = train.subset("val")
    if not len(val):
        return ScoringData(test, None, loaders, [])
    loaders["val"] = loader(val)
    return ScoringData(test, val, loaders, [])


def fold_loaders(data: ScoringData, fold: int | None) -> dict[str, DataLoader]:
    """The loaders a model scores: the test images, and as `val` its own validation images
    (the hold-out, or with folds the fold it held out)."""
    loaders = {"test": data.loaders["test"]}
    name = "val" if fold is None else f"fold_{fold}"
    if name in data.loaders:
        loaders["val"] = data.loaders[name]
    return loaders


def pool_out_of_fold(data: ScoringData, fold_probs: list[np.ndarray]) -> np.ndarray:
    """One (N x classes) array over `data.val` from each fold model's probabilities on its own fold."""
    pooled = np.full((len(data.val), fold_probs[0].shape[1]), np.nan, dtype=fold_probs[0].dtype)
    for rows, prob in zip(data.fold_rows, fold_probs):
        pooled[rows] = prob
    assert not np.isnan(pooled).any(), "every training image is in exactly one fold"
    return pooled


def fold_report(data: ScoringData, fold_probs: list[np.ndarray], epochs: list[int], positive: str) -> dict:
    """Each fold model's metrics on the fold it held out, and their spread across folds (mean, sd, min, max)."""
    classes = data.val.classes
    per_fold = {}
    for f, (rows, prob, epoch) in enumerate(zip(data.fold_rows, fold_probs, epochs)):
        m = classification_metrics(data.val.labels[rows], prob, classes, positive)
        per_fold[f"fold_{f}"] = {"epoch": epoch, "n": len(rows), **{k: m[k] for k in FOLD_METRICS}}
    spread = {}
    for key in FOLD_METRICS:
        values = [r[key] for r in per_fold.values() if r[key] is not None]
        spread[key] = None if not values else {
            "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "min": float(np.min(values)), "max": float(np.max(values))}
    return {"per_fold": per_fold, "spread": spread}


def describe(k: int) -> str:
    return (f"{k}-fold cross-validation: each seed's test probabilities are the mean of its {k} fold models'; "
            "the operating threshold is chosen on the pooled out-of-fold predictions (every training image, "
            "predicted by the model that held it out); per_fold: each model's metrics on its held-out fold, "
            "spread: their mean, sd (ddof 1), min and max across folds (validation only, not test metrics)")
