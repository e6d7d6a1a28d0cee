"""`data.source: demo`: a small synthetic two-class image set, made inside the download stage.

The offline quick start needs data that every fresh clone has, with no
network and nothing beside the repository, and we may not redistribute real
X-rays. So the download stage draws them: smooth noise for `health`, the same
with a bright blob for `tb` (`cxrlab.data.synthetic`), so a small model learns
the difference and the figures are not empty. The folder names match the
default `data.classes` ({Healthy: health, TB: tb}); every file, folder and
summary line says "synthetic", and data/raw/SYNTHETIC.txt says what they are.
Seeded: every run draws the same images.
"""

from __future__ import annotations

from pathlib import Path

from cxrlab.data.synthetic import make_dataset

SOURCE = "demo"
ROOT = "synthetic-demo"  # the top folder under data/raw
PER_CLASS = 60
SIZE = 128
SEED = 0
LAYOUT = {"Healthy": ("health", "synthetic-h"), "TB": ("tb", "synthetic-tb")}
NOTICE = f"""SYNTHETIC IMAGES, NOT CHEST X-RAYS.

Made by the download stage for data.source: demo (cxrlab/data/demo.py):
{PER_CLASS} images per class at {SIZE} x {SIZE} px, seed {SEED}. health/ holds smooth
noise, tb/ the same with a bright blob. They exercise the pipeline offline;
no figure made from them says anything about tuberculosis.
"""


def make_demo(target: Path) -> str:
    """Fill the empty folder `target` with the demo set; return the download's one-line summary."""
    make_dataset(target, n_per_class=PER_CLASS, size=SIZE, layout=LAYOUT, seed=SEED, subdir=ROOT)
    (target / ROOT / "SYNTHETIC.txt").write_text(NOTICE)
    return (f"demo -> {2 * PER_CLASS} SYNTHETIC images ({PER_CLASS} per class, {SIZE} px, not X-rays: "
            f"see {ROOT}/SYNTHETIC.txt)")
