"""Every image mode a medical folder may hold becomes the same 3-channel 8-bit image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlab.data.datasets import to_model_input
from cxrlab.data.images import check_image, load_rgb

GRAY = 200  # the grey level every file below encodes
LIMITS = {"max_pixels": 1000, "min_side": 1}  # the 8 x 8 test images are inside these


def write(tmp_path, mode: str, suffix: str = ".png"):
    path = tmp_path / f"{mode.replace(';', '_')}{suffix}"
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 8), GRAY * 257, dtype=np.uint16))  # 16-bit: 200/255 of full range
    elif mode == "P":
        img = Image.new("L", (8, 8), GRAY).convert("P")
    elif mode == "CMYK":
        img = Image.new("RGB", (8, 8), (GRAY,) * 3).convert("CMYK")
    else:
        img = Image.new("L", (8, 8), GRAY).convert(mode)
    img.save(path)
    return path


@pytest.mark.parametrize("mode, suffix", [("L", ".png"), ("I;16", ".png"), ("P", ".png"), ("RGB", ".png"),
                                          ("RGBA", ".png"), ("LA", ".png"), ("CMYK", ".jpg"), ("L", ".jpg")])
def test_every_mode_becomes_three_channel_8_bit(tmp_path, mode, suffix):
    path = write(tmp_path, mode, suffix)
    assert Image.open(path).mode == mode
    array = load_rgb(path, 4, **LIMITS)
    assert array.shape == (3, 4, 4) and array.dtype == np.uint8
    tolerance = 3 if suffix == ".jpg" else 0  # JPEG is lossy
    assert np.abs(array.astype(int) - GRAY).max() <= tolerance, (mode, array[:, 0, 0])


def test_check_image_names_what_is_wrong(tmp_path):
    good = write(tmp_path, "L")
    assert check_image(good, **LIMITS) is None
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-20])
    text = tmp_path / "text.png"
    text.write_text("hello")
    assert check_image(truncated, **LIMITS) and check_image(text, **LIMITS)


def _preprocessed(tmp_path, colour: bool):
    """Run the preprocess stage on a tiny split of generated images (colour: one RGB image)."""
    from tests.conftest import copy_project, set_params, stage

    project = copy_project(tmp_path / "project")
    set_params(project / "params.yaml", {"data.image_size": 16, "data.min_image_side": 16})
    rows = []
    for split, label, name in (("train", 0, "h1.png"), ("train", 1, "tb1.png"), ("test", 0, "h2.png")):
        folder = project / "data" / "dataset" / split / ["Healthy", "TB"][label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(label).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        if not (colour and name == "tb1.png"):
            pixels[..., 1] = pixels[..., 2] = pixels[..., 0]
        Image.fromarray(pixels).save(folder / name)
        rows.append((split, f"{name},{['Healthy', 'TB'][label]},{label},{'train' if split == 'train' else 'test'}"))
    for split in ("train", "test"):
        csv = project / "data" / "split" / f"{split}.csv"
        csv.parent.mkdir(parents=True, exist_ok=True)
        csv.write_text("filename,class,label,subset\n" + "".join(r + "\n" for s, r in rows if s == split))
    proc = stage("preprocess", cwd=project)
    assert proc.returncode == 0, proc.stderr
    return project / "data" / "prepared"


@pytest.mark.parametrize("colour", [False, True])
def test_preprocess_keeps_one_channel_only_when_every_image_is_grayscale(tmp_path, colour):
    prepared = _preprocessed(tmp_path, colour)
    train, test = np.load(prepared / "train.npy"), np.load(prepared / "test.npy")
    channels = 3 if colour else 1
    assert train.shape == (2, channels, 16, 16) and test.shape == (1, channels, 16, 16)
    assert json.loads((prepared / "meta.json").read_text())["channels"] == channels
    assert not list(prepared.glob("*.rgb.npy"))
    expected = load_rgb(prepared.parent / "dataset" / "train" / "Healthy" / "h1.png", 16, max_pixels=400, min_side=16)
    np.testing.assert_array_equal(train[0], expected[:channels])


def test_one_channel_input_reaches_the_model_as_three_equal_channels():
    gray = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    one = to_model_input(gray, torch.device("cpu"), mean, std, channels_last=True)
    three = to_model_input(gray.expand(-1, 3, -1, -1).contiguous(), torch.device("cpu"), mean, std, channels_last=False)
    assert one.shape == (2, 3, 8, 8) and one.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(one, three, rtol=0, atol=0)
