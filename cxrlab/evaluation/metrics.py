"""Classification metrics from predicted probabilities, with scikit-learn.

`classification_metrics` returns a JSON-ready dict: per-class values are
dicts keyed by class name (so `dvc metrics diff` shows each), the headline
`f1`, `sensitivity` and `specificity` are those of the positive class, and
the confusion matrix is `{true class: {predicted class: count}}`. A metric
that is undefined on the data (ROC AUC with one class present) is None.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def specificity_per_class(cm: np.ndarray) -> np.ndarray:
    """TN / (TN + FP) of each class, one-vs-rest, from a confusion matrix (rows true)."""
    total = cm.sum()
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = total - tp - fp - fn
    with np.errstate(divide="ignore", invalid="ignore"):
        spec = tn / (tn + fp)
    return np.where(tn + fp > 0, spec, 0.0)


def roc_auc(y_true: np.ndarray, prob: np.ndarray, positive: int) -> float | None:
    """Binary: AUC of the positive class's probability. k classes: macro one-vs-rest."""
    k = prob.shape[1]
    if len(np.unique(y_true)) < 2:
        return None
    if k == 2:
        return float(roc_auc_score(y_true == positive, prob[:, positive]))
    if len(np.unique(y_true)) < k:
        return None
    return float(roc_auc_score(y_true, prob, multi_class="ovr", average="macro", labels=list(range(k))))


def cross_entropy(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Mean negative log-probability of the true class."""
    picked = prob[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))


def decide(prob: np.ndarray, positive: int, threshold: float | None = None) -> np.ndarray:
    """The class decided for each row of `prob`: the argmax, or for two classes with an operating
    `threshold` the positive class iff its probability is >= the threshold (the rule of every output)."""
    prob = np.asarray(prob)
    if threshold is None or prob.shape[-1] != 2:
        return prob.argmax(axis=-1)
    return np.where(prob[..., positive] >= threshold, positive, 1 - positive)


def classification_metrics(y_true, prob, classes: list[str], positive: str, threshold: float | None = None) -> dict:
    """Every test metric of predictions `prob` (N x k probabilities) against `y_true`, decided by
    `decide` (at `threshold` when given); ROC AUC and the loss use the probabilities alone."""
    y_true = np.asarray(y_true, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    k = len(classes)
    pos = classes.index(positive)
    labels = list(range(k))
    y_pred = decide(prob, pos, threshold)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    spec = specificity_per_class(cm)

    def by_class(values) -> dict:
        return {c: float(v) for c, v in zip(classes, values)}

    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1[pos]),
        "sensitivity": float(recall[pos]),
        "specificity": float(spec[pos]),
        "precision": float(precision[pos]),
        "roc_auc": roc_auc(y_true, prob, pos),
        "loss": cross_entropy(y_true, prob),
        "macro": {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "specificity": float(spec.mean()),
            "f1": float(f1.mean()),
        },
        "per_class": {
            "precision": by_class(precision),
            "recall": by_class(recall),
            "specificity": by_class(spec),
            "f1": by_class(f1),
            "support": {c: int(s) for c, s in zip(classes, support)},
        },
        "confusion_matrix": {
            true: {pred: int(cm[i, j]) for j, pred in enumerate(classes)} for i, true in enumerate(classes)
        },
    }


def confusion_rows(metrics: dict, classes: list[str]) -> list[list[int]]:
    """The confusion matrix of `classification_metrics` as a list of rows (true class)."""
    cm = metrics["confusion_matrix"]
    return [[cm[t][p] for p in classes] for t in classes]
