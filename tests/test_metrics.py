"""Metrics against values computed by hand on fixed predictions."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlab.evaluation.metrics import (
    classification_metrics,
    confusion_rows,
    specificity_per_class,
)
from cxrlab.training.engine import confusion_summary

CLASSES = ["Healthy", "TB"]


def probs_for(p_tb: list[float]) -> np.ndarray:
    p = np.asarray(p_tb)
    return np.stack([1 - p, p], axis=1)


# 6 healthy, 4 TB; one healthy scored 0.7 (FP), one TB scored 0.35 (FN)
Y = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
P_TB = [0.1, 0.2, 0.3, 0.4, 0.45, 0.7, 0.35, 0.6, 0.8, 0.9]


def test_binary_metrics_by_hand():
    m = classification_metrics(Y, probs_for(P_TB), CLASSES, "TB")
    assert m["n"] == 10
    assert m["confusion_matrix"] == {"Healthy": {"Healthy": 5, "TB": 1}, "TB": {"Healthy": 1, "TB": 3}}
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.75)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(0.75)
    assert m["per_class"]["precision"] == pytest.approx({"Healthy": 5 / 6, "TB": 0.75})
    assert m["per_class"]["recall"] == pytest.approx({"Healthy": 5 / 6, "TB": 0.75})
    assert m["per_class"]["specificity"] == pytest.approx({"Healthy": 0.75, "TB": 5 / 6})
    assert m["per_class"]["f1"] == pytest.approx({"Healthy": 5 / 6, "TB": 0.75})
    assert m["per_class"]["support"] == {"Healthy": 6, "TB": 4}
    for key in ("precision", "recall", "specificity", "f1"):
        assert m["macro"][key] == pytest.approx((5 / 6 + 0.75) / 2)
    # AUC: of the 24 (TB, healthy) pairs, the TB image scores higher in 3 + 5 + 6 + 6 = 20
    assert m["roc_auc"] == pytest.approx(20 / 24)
    p_true = [1 - p if y == 0 else p for y, p in zip(Y, P_TB)]
    assert m["loss"] == pytest.approx(-np.mean(np.log(p_true)))


def test_the_studys_confusion_matrix_gives_its_published_accuracy_and_f1():
    # baseline: [[756 4] [6 154]] -> 98.91 % and F1 0.9686 in the study's table
    y = [0] * 760 + [1] * 160
    p = [0.1] * 756 + [0.9] * 4 + [0.1] * 6 + [0.9] * 154
    m = classification_metrics(y, probs_for(p), CLASSES, "TB")
    assert confusion_rows(m, CLASSES) == [[756, 4], [6, 154]]
    assert round(100 * m["accuracy"], 2) == 98.91
    assert round(m["f1"], 4) == 0.9686


def test_positive_class_choice_swaps_the_headline():
    m = classification_metrics(Y, probs_for(P_TB), CLASSES, "Healthy")
    assert m["f1"] == pytest.approx(5 / 6)
    assert m["sensitivity"] == pytest.approx(5 / 6) and m["specificity"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(20 / 24)


def test_three_classes():
    classes = ["COVID", "Normal", "TB"]
    y = [0, 0, 1, 1, 2, 2]
    prob = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1],
                     [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3]])
    m = classification_metrics(y, prob, classes, "TB")
    assert confusion_rows(m, classes) == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["recall"] == pytest.approx({"COVID": 0.5, "Normal": 1.0, "TB": 0.5})
    assert m["per_class"]["precision"] == pytest.approx({"COVID": 0.5, "Normal": 2 / 3, "TB": 1.0})
    assert m["per_class"]["specificity"] == pytest.approx({"COVID": 0.75, "Normal": 0.75, "TB": 1.0})
    assert 0 <= m["roc_auc"] <= 1


def test_auc_is_undefined_with_one_class_present():
    m = classification_metrics([1, 1], probs_for([0.2, 0.9]), CLASSES, "TB")
    assert m["roc_auc"] is None
    assert m["specificity"] == 0.0  # no negatives: reported as 0, not a crash


def test_specificity_and_training_summary_from_counts():
    cm = np.array([[5, 1], [1, 3]])
    np.testing.assert_allclose(specificity_per_class(cm), [0.75, 5 / 6])
    assert confusion_summary(cm, positive=1) == pytest.approx({"accuracy": 0.8, "f1": 0.75})


def test_prediction_is_float32_and_bit_identical_under_any_amp_setting():
    """Evaluation never runs under autocast: a bf16 runtime (as a GPU's) gives the float32 result."""
    import dataclasses

    import torch

    from cxrlab.model.backbones import build_model
    from cxrlab.training.engine import predict
    from cxrlab.training.runtime import setup

    torch.manual_seed(0)
    model = build_model("resnet18", 2, image_size=32)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    batches = [(images, torch.zeros(4, dtype=torch.int64))]
    rt = setup("cpu", amp=False, channels_last=False, deterministic=True)
    mixed = dataclasses.replace(rt, amp_dtype=torch.bfloat16)
    norm = ([0.5] * 3, [0.25] * 3)
    exact = predict(model, batches, rt, *norm)[0]
    assert exact.dtype == np.float32
    assert np.array_equal(predict(model, batches, mixed, *norm)[0], exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the old code did: visibly different
        rounded = torch.softmax(model((images.float() / 255 - 0.5) / 0.25).float(), 1).detach().numpy()
    assert not np.array_equal(rounded, exact)
