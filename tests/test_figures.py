"""The plots stage's PNG figures fit a page and keep their titles, with one variant or six."""

from __future__ import annotations

from PIL import Image

from cxrlab.reports import figures

VARIANTS = ["baseline", "regu_penalty", "dropout", "sharpness", "contrast", "all_variants"]
BINS = [{"bin": i, "low": i / 15, "high": (i + 1) / 15, "count": 3, "confidence": (i + 0.5) / 15,
         "accuracy": (i + 0.4) / 15} for i in range(15)]
PAGE_PX = 1400  # a figure wider than this is scaled down past reading on a laptop screen or A4 page


def size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_per_variant_figures_wrap_into_rows_that_fit_a_page(tmp_path):
    figures.reliability({v: (BINS, 0.05) for v in VARIANTS}, tmp_path / "rel.png")
    figures.confusion_matrices({v: [[30, 5], [4, 40]] for v in VARIANTS}, ["Healthy", "TB"], tmp_path / "cm.png")
    for name in ("rel.png", "cm.png"):
        width, height = size(tmp_path / name)
        assert width <= PAGE_PX and height > width / 2, (name, width, height)  # two rows of three


def test_one_variant_keeps_the_whole_title(tmp_path):
    title = "Test confusion matrices (best epoch on validation; at the operating threshold, the argmax where none)"
    figures.confusion_matrices({"baseline": [[30, 5], [4, 40]]}, ["Healthy", "TB"], tmp_path / "cm.png",
                               title=title)
    figures.reliability({"baseline": (BINS, 0.05)}, tmp_path / "rel.png")
    # one 3.4-inch panel at 110 dpi is 374 px: a title wider than the panel widens the figure instead of
    # running off its edges (the figure is at least 5 inches wide and saved with a tight bounding box)
    assert size(tmp_path / "cm.png")[0] >= 5 * 110 * 0.85 and size(tmp_path / "rel.png")[0] >= 5 * 110 * 0.85
    assert "\n" in figures._wrap(title, 5.0) and all(len(line) <= 60 for line in figures._wrap(title, 5.0).split("\n"))
