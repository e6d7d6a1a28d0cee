"""Finding, ordering and decoding image files.

Every image, whatever its mode (8- or 16-bit grayscale, palette, RGB, RGBA,
CMYK), becomes an 8-bit RGB array resized to the training resolution with
the same filter torchvision's `Resize` uses on PIL images (bilinear, with
antialiasing). Training, evaluation and prediction all go through `load_rgb`.
"""

from __future__ import annotations

import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

_DIGITS = re.compile(r"(\d+)")


def is_image_name(name: str) -> bool:
    """An image by its name: a known suffix, not a hidden or macOS resource file."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def natural_key(name: str) -> tuple:
    """Sort key comparing the numbers in a file name by value: h2 < h10.

    `h0001.png` -> ('h', 1, ''); `CHNCXR_0005_0.png` -> ('chncxr_', 5, '_', 0, '').
    Text parts are compared case-insensitively; two names with the same key
    (`h1.png`, `h0001.png`, `H0001.jpg`) carry the same ID.
    """
    parts = _DIGITS.split(Path(name).stem)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `img`, whatever its mode."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (or 32-bit) grayscale: map the full 16-bit range onto 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, YCbCr ...


def check_image(path: str | Path) -> str | None:
    """None if `path` decodes completely, else why not."""
    try:
        with Image.open(path) as img:
            img.load()
            to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # unreadable, truncated, not an image
        return str(err) or type(err).__name__
    return None


def check_images(paths: list[Path], workers: int) -> dict[Path, str]:
    """{path: reason} for every file of `paths` that does not decode, checked in parallel."""
    if workers <= 1 or len(paths) < 64:
        results = map(check_image, paths)
        return {p: why for p, why in zip(paths, results) if why}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check_image, paths, chunksize=32)
        return {p: why for p, why in zip(paths, results) if why}


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode `path` into a (3, size, size) uint8 array.

    Raises `OSError` (or `PIL.UnidentifiedImageError`, a subclass) for a file
    that is not a readable image, truncated ones included.
    """
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()
