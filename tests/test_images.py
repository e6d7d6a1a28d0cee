"""Every image mode a medical folder may hold becomes the same 3-channel 8-bit image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages.images import check_image, load_rgb

GRAY = 200  # the grey level every file below encodes


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
    array = load_rgb(path, 4)
    assert array.shape == (3, 4, 4) and array.dtype == np.uint8
    tolerance = 3 if suffix == ".jpg" else 0  # JPEG is lossy
    assert np.abs(array.astype(int) - GRAY).max() <= tolerance, (mode, array[:, 0, 0])


def test_check_image_names_what_is_wrong(tmp_path):
    good = write(tmp_path, "L")
    assert check_image(good) is None
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-20])
    text = tmp_path / "text.png"
    text.write_text("hello")
    assert check_image(truncated) and check_image(text)
