"""Small generated chest-X-ray-like datasets: for the offline demo source, tests and benchmarks.

Healthy images are smooth noise; TB images add a bright blob, so even a tiny
model learns to separate them in a few epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TBX11K_LIKE = {"Healthy": ("health", "h"), "TB": ("tb", "tb")}


def make_image(rng: np.random.Generator, size: int, sick: bool, brightness: float = 0.0,
               blob_scale: float = 1.0) -> np.ndarray:
    """One image; `brightness` shifts every pixel and `blob_scale` scales the blob's radius: a shifted
    "other hospital" for external-validation tests (the defaults draw the demo and test images)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 90 + brightness + 60 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 3)  # a lung-field-like glow
    img = base + rng.normal(0, 12, (size, size))
    if sick:
        cx, cy = rng.uniform(0.25, 0.75, 2)
        r = rng.uniform(0.08, 0.15) * blob_scale
        img += 90 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, n_per_class: int = 20, size: int = 48, layout=TBX11K_LIKE,
                 seed: int = 0, subdir: str = "TBX11K/imgs", brightness: float = 0.0,
                 blob_scale: float = 1.0) -> Path:
    """Write `n_per_class` PNGs per class under root/subdir/<folder>/<prefix><id>.png (`brightness`,
    `blob_scale`: see `make_image`)."""
    rng = np.random.default_rng(seed)
    for label, (folder, prefix) in enumerate(layout.values()):
        out = Path(root) / subdir / folder
        out.mkdir(parents=True, exist_ok=True)
        ids = np.sort(rng.choice(np.arange(1, 10 * n_per_class + 1), n_per_class, replace=False))
        for i in ids:
            Image.fromarray(make_image(rng, size, sick=label == 1, brightness=brightness,
                                            blob_scale=blob_scale), mode="L").save(out / f"{prefix}{i:04d}.png")
    return Path(root)
