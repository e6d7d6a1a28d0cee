"""Stage `split`: the study's per-class split by ID, plus a validation hold-out or k folds.

Per class, images are sorted by their numeric ID; the first
floor(test_fraction * n) are the test set, the rest the training set, as in
the study. From each class's training part, round(val_fraction * n_train)
images drawn at random with `data.seed` are marked `subset=val`: the training
stage selects its best epoch on them and never looks at the test set.

With `data.folds: k` the training part is instead cut into k stratified folds
(scikit-learn's StratifiedKFold, shuffled with `data.seed`, over the class
labels in ID order), each row marked `subset=fold_<f>`; `data.val_fraction`
is then unused. The fold is recorded in the CSV, not re-drawn downstream, so
train and evaluate agree on it by construction (docs/cross-validation.md).

Writes `data/split/train.csv` (subset train and val, or fold_0..fold_<k-1>)
and `test.csv`, with columns filename, label, class, subset, path (relative to
data/raw), and the report `metrics/split_report.json`: per class and split, the
count and the first and last file, and with folds the count of each class per
fold; `metrics/split.json` holds the total counts only (for dvc exp show).
"""

from __future__ import annotations

import math
import os
from decimal import Decimal
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from cxrlab import paths
from cxrlab.config.schema import DataParams
from cxrlab.data.images import IMAGE_SUFFIXES, check_images
from cxrlab.data.layout import ClassFolder, find_class_folders, list_class
from cxrlab.errors import UserError
from cxrlab.io.fsio import atomic_dir, check_writable, write_json
from cxrlab.io.records import write_rows


def n_test(n: int, test_fraction: float) -> int:
    """floor(test_fraction * n), exact for decimal fractions (0.29 * 100 is 29, not 28)."""
    return math.floor(Decimal(str(test_fraction)) * n)


def split_by_id(images: list[str], test_fraction: float) -> tuple[list[str], list[str]]:
    """(test, train): the first floor(test_fraction * n) of the ID-sorted `images`, the rest."""
    k = n_test(len(images), test_fraction)
    return images[:k], images[k:]


def hold_out(train: list[str], val_fraction: float, seed: int, label: int) -> set[str]:
    """The names drawn at random (seeded per class) from `train` for validation."""
    k = round(len(train) * val_fraction)
    if val_fraction > 0 and len(train) >= 2:
        k = min(max(k, 1), len(train) - 1)  # keep at least one image on each side
    rng = np.random.default_rng([seed, label])
    chosen = rng.choice(len(train), size=k, replace=False) if k else []
    return {train[i] for i in chosen}


def fold_name(fold: int) -> str:
    """The `subset` value of the training rows held out by fold `fold` (0-based)."""
    return f"fold_{fold}"


def assign_folds(labels: list[int], k: int, seed: int) -> list[int]:
    """Each training image's fold (0..k-1): StratifiedKFold over `labels` (in row order), shuffled with `seed`."""
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[held_out] = fold
    return folds.tolist()


def cut_into_folds(train_rows: list[dict], k: int, seed: int) -> dict[str, dict[str, int]]:
    """Mark every training row with its fold (`subset=fold_<f>`); returns {fold: {class: count}}.
    Every class needs at least k training images, or some fold would hold none of it."""
    counts: dict[str, int] = {}
    for r in train_rows:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    short = {c: n for c, n in counts.items() if n < k}
    if short:
        raise UserError(f"data.folds {k} needs at least {k} training images per class, but "
                        + ", ".join(f"{c!r} has {n}" for c, n in short.items())
                        + "; lower data.folds, or add images (or raise data.max_per_class)")
    folds = assign_folds([int(r["label"]) for r in train_rows], k, seed)
    table: dict[str, dict[str, int]] = {fold_name(f): {c: 0 for c in counts} for f in range(k)}
    for r, fold in zip(train_rows, folds):
        r["subset"] = fold_name(fold)
        table[r["subset"]][r["class"]] += 1
    return table


def class_rows(cls: ClassFolder, test_fraction: float, val_fraction: float, seed: int,
               raw_root) -> tuple[list[dict], list[dict], dict]:
    """The test rows, train rows and the report entry of one class."""
    test, train = split_by_id(cls.images, test_fraction)
    if not test or not train:
        raise UserError(
            f"class {cls.name!r} has {len(cls.images)} images: data.test_fraction "
            f"{test_fraction} leaves {len(test)} for test and {len(train)} for training. "
            "Add images or change data.test_fraction (or data.max_per_class)"
        )
    val = hold_out(train, val_fraction, seed, cls.label)
    rel = cls.folder.relative_to(raw_root).as_posix()

    def row(name: str, subset: str) -> dict:
        return {"filename": name, "label": cls.label, "class": cls.name, "subset": subset,
                "path": f"{rel}/{name}" if rel != "." else name}

    report = {
        "test": _span(test),
        "train": {**_span(train), "of_which_val": len(val)},
    }
    return ([row(n, "test") for n in test],
            [row(n, "val" if n in val else "train") for n in train],
            report)


def _span(names: list[str]) -> dict:
    return {"count": len(names), "first": names[0], "last": names[-1]}


def drop_bad_images(classes: list[ClassFolder], policy: str, max_per_class: int | None,
                    max_pixels: int, min_side: int) -> dict[str, str]:
    """Decode every image that can reach the split; with `skip`, drop the bad ones
    (before the ID order is cut, so the next good image takes a bad one's place).
    An image over `max_pixels` pixels or with a side under `min_side` is a bad one.
    Returns {path under data/raw: reason}; with `error`, any bad image is an error."""
    workers = max(1, min(os.cpu_count() or 1, 16))
    bad: dict[str, str] = {}
    for cls in classes:
        while True:  # with max_per_class, a dropped image lets the next one in: check it too
            wanted = cls.images[:max_per_class] if max_per_class else cls.images
            unchecked = [n for n in wanted if (cls.folder / n).relative_to(paths.RAW).as_posix() not in bad]
            found = check_images([cls.folder / n for n in unchecked], workers, max_pixels, min_side)
            if not found:
                break
            for path, why in found.items():
                bad[path.relative_to(paths.RAW).as_posix()] = why
            cls.images = [n for n in cls.images if (cls.folder / n).relative_to(paths.RAW).as_posix() not in bad]
            if policy == "error":
                break
        if not cls.images:
            raise UserError(f"class {cls.name!r}: none of the images in {cls.folder} can be read")
    if bad and policy == "error":
        raise UserError(f"{len(bad)} images in {paths.RAW} cannot be read:\n  "
                        + "\n  ".join(f"{p}: {why}" for p, why in sorted(bad.items()))
                        + "\nReplace or remove them, or set data.on_bad_image: skip to leave them out")
    for path, why in sorted(bad.items()):
        print(f"split: skipped unreadable image {path}: {why}")
    return dict(sorted(bad.items()))


def split_dataset(data: DataParams) -> None:
    if not paths.RAW.is_dir():
        raise UserError(f"{paths.RAW} does not exist; run the download stage first (dvc repro download)")
    check_writable(paths.SPLIT, paths.SPLIT_REPORT)

    folders = find_class_folders(paths.RAW, data.class_spec)
    if data.positive_class not in folders:  # with classes: auto, the first chance to check it
        raise UserError(f"data.positive_class {data.positive_class!r} is not one of the classes "
                        f"{list(folders)} found under {paths.RAW}; set data.positive_class to one of them")
    classes = [list_class(name, label, folder) for label, (name, folder) in enumerate(folders.items())]
    bad = drop_bad_images(classes, data.on_bad_image, data.max_per_class, data.max_image_pixels,
                          data.min_image_side)
    test_rows, train_rows = [], []
    report: dict = {"classes": {}, "ignored_files": 0, "bad_images": len(bad), "bad_image_files": bad}
    ignored: dict[str, int] = {}  # files in class folders that are not images, by suffix
    for cls in classes:
        name, folder = cls.name, cls.folder
        if data.max_per_class:
            cls.images = cls.images[: data.max_per_class]
        val_fraction = 0.0 if data.folds else data.val_fraction  # folds replace the hold-out
        test, train, entry = class_rows(cls, data.test_fraction, val_fraction, data.seed, paths.RAW)
        test_rows += test
        train_rows += train
        report["classes"][name] = {"folder": folder.relative_to(paths.RAW).as_posix(), **entry}
        report["ignored_files"] += len(cls.ignored)
        for file in cls.ignored:
            suffix = "hidden" if file.startswith(".") else (Path(file).suffix.lower() or "no suffix")
            ignored[suffix] = ignored.get(suffix, 0) + 1
    report["ignored_by_suffix"] = dict(sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0])))
    if ignored:  # said once: a .dcm or .gif left out silently would look like a missing image
        print(f"split: ignored {report['ignored_files']} files in the class folders that are not read as images ("
              + ", ".join(f"{k} {n}" for k, n in report["ignored_by_suffix"].items())
              + f"); read are {', '.join(sorted(IMAGE_SUFFIXES))}")

    report["total"] = {
        "test": len(test_rows),
        "train": len(train_rows),
        "of_which_val": sum(r["subset"] == "val" for r in train_rows),
    }
    if data.folds:
        report["folds"] = cut_into_folds(train_rows, data.folds, data.seed)
        for entry in report["classes"].values():
            del entry["train"]["of_which_val"]  # no hold-out: every training image is in one fold
        del report["total"]["of_which_val"]
    with atomic_dir(paths.SPLIT) as tmp:
        write_rows(tmp / paths.TRAIN_CSV.name, train_rows)
        write_rows(tmp / paths.TEST_CSV.name, test_rows)
    write_json(paths.SPLIT_REPORT, report)
    # the headline for dvc exp show: image counts only (names and bad files stay in the report)
    write_json(paths.SPLIT_METRICS, {**report["total"], "bad_images": report["bad_images"]})
    for name, entry in report["classes"].items():
        t, tr = entry["test"], entry["train"]
        held = (f"in {data.folds} folds" if data.folds else f"{tr['of_which_val']} held out for validation")
        print(f"split: {name}: test {t['count']} ({t['first']}..{t['last']}), "
              f"train {tr['count']} ({tr['first']}..{tr['last']}, {held})")
    if data.folds:
        print(f"split: {data.folds} stratified folds of the training part (data.val_fraction is not used): "
              + "; ".join(f"{f} " + ", ".join(f"{c} {n}" for c, n in per.items())
                          for f, per in report["folds"].items()))

