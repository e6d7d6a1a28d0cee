"""The split's CSV files: one row per image (filename, label, class, subset, path)."""

from __future__ import annotations

import csv
from pathlib import Path

from cxrlab.errors import UserError

COLUMNS = ("filename", "label", "class", "subset", "path")


def read_rows(csv_path: Path, made_by: str = "split") -> list[dict]:
    if not csv_path.is_file():
        raise UserError(f"{csv_path} does not exist; run the {made_by} stage first (dvc repro {made_by})")
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(csv_path: Path, rows: list[dict]) -> None:
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def split_classes(csv_path: Path) -> list[str]:
    """The class names in label order, as the split stage resolved `data.classes` (a list or `auto` included)."""
    names = {int(r["label"]): r["class"] for r in read_rows(csv_path)}
    return [names[i] for i in sorted(names)]
