"""Grad-CAM for every backbone, and the explain stage's gallery that `dvc plots show` displays."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlab.explain.cam import heatmaps, overlay, target_layer, vit_tokens_to_grid
from cxrlab.explain.gallery import pick
from cxrlab.model.architectures import ARCHITECTURES
from cxrlab.model.backbones import build_model, head
from tests.conftest import dvc


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_has_a_target_layer(arch):
    with torch.device("meta"):  # structure only, no weights: instant even for resnet152
        model = build_model(arch, 2, dropout=0.5)
    assert isinstance(target_layer(model, arch), torch.nn.Module)


@pytest.mark.parametrize("arch", ["resnet18", "shufflenet_v2_x0_5", "densenet121", "efficientnet_b0", "vit_b_16"])
def test_grad_cam_runs_on_each_backbone_family(arch):
    torch.manual_seed(0)
    model = build_model(arch, 2)
    linear = head(model)[1]
    with torch.no_grad():  # class 1's score is minus class 0's (ViT's head even starts at zero)
        torch.nn.init.normal_(linear.weight[0], std=0.1)
        linear.weight[1] = -linear.weight[0]
        linear.bias[1] = -linear.bias[0]
    size = 224 if arch.startswith("vit") else 96  # torchvision's ViT takes 224 px only
    images = np.random.default_rng(0).integers(0, 256, (1, 3, size, size), dtype=np.uint8)
    maps = [heatmaps(model, arch, images, [0.5] * 3, [0.25] * 3, target_class=c) for c in (0, 1)]
    for m in maps:
        assert m.shape == (1, size, size) and m.dtype == np.float32
        assert m.min() >= 0 and m.max() <= 1
    # the raw maps of the two classes are each other's negatives, so after Grad-CAM's ReLU
    # one of them is all zero only if the raw map is flat: no gradient reached the layer
    assert max(m.max() for m in maps) > 0
    picture = overlay(images[0], maps[1][0])
    assert picture.shape == (size, size, 3) and picture.dtype == np.uint8


def test_vit_tokens_become_a_grid_in_reading_order():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # class token + 2 x 2 patches
    grid = vit_tokens_to_grid(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2, :]) and torch.equal(grid[:, :, 1, 0], tokens[:, 3, :])


def test_pick_groups_and_orders_by_confidence():
    labels = np.array([1, 1, 1, 0, 0, 0])
    decided = np.array([1, 1, 0, 1, 0, 0])
    p_pos = np.array([0.6, 0.9, 0.1, 0.7, 0.2, 0.05])
    picked = pick(labels, decided, p_pos, positive=1, per_group=1)
    assert {k: v.tolist() for k, v in picked.items()} == {
        "true positives": [1], "false negatives": [2], "false positives": [3], "true negatives": [5]}


def test_explain_stage_writes_a_gallery_dvc_shows(trained_project):
    project = trained_project
    result = dvc("repro", "explain@baseline", cwd=project)
    assert "Running stage 'explain@baseline'" in result.stdout
    assert "Running stage 'train@baseline'" not in result.stdout

    out = project / "explanations/baseline"
    with Image.open(out / "gallery.png") as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 400
    with open(out / "gallery.csv", newline="") as f:
        shown = list(csv.DictReader(f))
    with open(project / "metrics/evaluate/baseline/predictions.csv", newline="") as f:
        evaluated = {r["filename"]: r for r in csv.DictReader(f)}
    assert 1 <= len(shown) <= 4 * 4
    for r in shown:  # each image in the group evaluate's decision puts it in
        truth, decision = evaluated[r["filename"]]["class"], evaluated[r["filename"]]["best_decision"]
        expected = {("TB", "TB"): "true positives", ("TB", "Healthy"): "false negatives",
                    ("Healthy", "TB"): "false positives", ("Healthy", "Healthy"): "true negatives"}
        assert r["group"] == expected[truth, decision] and r["decision"] == decision
    # one decision rule: the gallery's groups count the confusion matrix evaluate reports (its threshold's)
    best = json.loads((project / "metrics/evaluate/baseline/report.json").read_text())["best"]
    cm = best["confusion_matrix"]
    assert best["threshold"] is not None  # trained_project has an operating threshold
    assert (f"true positives {cm['TB']['TB']}, false negatives {cm['TB']['Healthy']}, false positives "
            f"{cm['Healthy']['TB']}, true negatives {cm['Healthy']['Healthy']}") in result.stdout

    rendered = project / "rendered"
    dvc("plots", "show", "-o", str(rendered), cwd=project)
    html = (rendered / "index.html").read_text()
    assert "explanations/baseline/gallery.png" in html and "<img" in html
