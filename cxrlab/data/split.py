"""Stage `split`: the test set (by ID, at random, or by groups), plus a validation hold-out or k folds.

`data.split` chooses the test set, always per class (stratified):
- `by_id` (the study's): images sorted by their numeric ID; the first
  floor(test_fraction * n) of each class are the test set, the rest the training set.
- `random`: floor(test_fraction * n) of each class drawn with `data.seed`. With
  `data.group_by` (a source: hospital, scanner) the draw is made within each group in
  proportion to its size, so every source large enough is in the test set.
- `grouped`: `data.group_by` (a patient, or a source) names groups that are never cut:
  scikit-learn's StratifiedGroupKFold (shuffled with `data.seed`) deals whole groups into
  round(1 / test_fraction) parts keeping the class balance, and the first part is the test
  set; the validation hold-out and the folds are drawn the same way from the training part.
  The test share is then about 1 / round(1 / test_fraction) (0.2 -> 1/5, 0.3 -> 1/3).
From each class's training part, round(val_fraction * n_train) images drawn at random with
`data.seed` (whole groups under `grouped`) are marked `subset=val`: the training stage selects
its best epoch on them and never looks at the test set.

With `data.folds: k` the training part is instead cut into k stratified folds
(scikit-learn's StratifiedKFold, shuffled with `data.seed`, over the class
labels in ID order), each row marked `subset=fold_<f>`; `data.val_fraction`
is then unused. The fold is recorded in the CSV, not re-drawn downstream, so
train and evaluate agree on it by construction (docs/cross-validation.md).

Writes `data/split/train.csv` (subset train and val, or fold_0..fold_<k-1>)
and `test.csv`, with columns filename, label, class, subset, path (relative to
data/raw), and the report `metrics/split_report.json`: per class and split, the
count and the first and last file, and with folds the count of each class per
fold; with `data.group_by` each group's count per split (all groups up to
GROUPS_LISTED, else how many groups each split holds, and how many straddle two), and a
warning on the console and in the report for any group large enough for a test image
that has none (a source missing from the test set makes its number say nothing about it).
`metrics/split.json` holds the total counts only (for dvc exp show).
"""

from __future__ import annotations

import math
import os
from decimal import Decimal
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from cxrlab import paths
from cxrlab.config.schema import DataParams
from cxrlab.data.groups import apportion, groups_of
from cxrlab.data.images import IMAGE_SUFFIXES, check_images
from cxrlab.data.layout import ClassFolder, find_class_folders, list_class
from cxrlab.errors import UserError
from cxrlab.io.fsio import atomic_dir, check_writable, write_json
from cxrlab.io.records import write_rows


def n_test(n: int, test_fraction: float) -> int:
    """floor(test_fraction * n), exact for decimal fractions (0.29 * 100 is 29, not 28)."""
    return math.floor(Decimal(str(test_fraction)) * n)


GROUPS_LISTED = 50  # the report lists each group's counts up to this many groups (sources, not patients)


def split_by_id(images: list[str], test_fraction: float) -> tuple[list[str], list[str]]:
    """(test, train): the first floor(test_fraction * n) of the ID-sorted `images`, the rest."""
    k = n_test(len(images), test_fraction)
    return images[:k], images[k:]


def draw_test(cls: ClassFolder, how: str, test_fraction: float, seed: int,
              groups: dict[str, str] | None) -> set[str]:
    """One class's test images under `by_id` or `random` (within each group, in proportion, with groups)."""
    k = n_test(len(cls.images), test_fraction)
    if how == "by_id":
        return set(cls.images[:k])
    rng = np.random.default_rng([seed, cls.label, 1])  # not the hold-out's stream ([seed, label])
    members: dict[str, list[str]] = {}
    for name in cls.images:
        members.setdefault(groups[name] if groups else "", []).append(name)
    quota = apportion(k, {g: len(m) for g, m in members.items()})
    return {m[i] for g, m in sorted(members.items()) for i in rng.choice(len(m), size=quota[g], replace=False)}


def group_parts(labels: list[int], groups: list[str], parts: int, seed: int, key: str) -> np.ndarray:
    """Each row's part (0..parts-1): whole groups dealt by StratifiedGroupKFold, keeping the class balance."""
    if len(set(groups)) < parts:
        raise UserError(f"{key} asks for {parts} parts of whole groups, but data.group_by finds only "
                        f"{len(set(groups))} groups; lower it, use data.split: random, or group more finely")
    part = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=seed)
    for i, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        part[held_out] = i
    return part


def parts_for(fraction: float) -> int:
    """How many equal parts of whole groups give about `fraction` in one part."""
    return max(2, round(1 / fraction))


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


def cut_into_folds(train_rows: list[dict], k: int, seed: int,
                   groups: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Mark every training row with its fold (`subset=fold_<f>`; whole groups when `groups` is given);
    returns {fold: {class: count}}. Every class needs at least k training images, or some fold would hold
    none of it."""
    counts: dict[str, int] = {}
    for r in train_rows:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    short = {c: n for c, n in counts.items() if n < k}
    if short:
        raise UserError(f"data.folds {k} needs at least {k} training images per class, but "
                        + ", ".join(f"{c!r} has {n}" for c, n in short.items())
                        + "; lower data.folds, or add images (or raise data.max_per_class)")
    labels = [int(r["label"]) for r in train_rows]
    folds = (assign_folds(labels, k, seed) if groups is None
             else group_parts(labels, groups, k, seed, "data.folds").tolist())
    table: dict[str, dict[str, int]] = {fold_name(f): {c: 0 for c in counts} for f in range(k)}
    for r, fold in zip(train_rows, folds):
        r["subset"] = fold_name(fold)
        table[r["subset"]][r["class"]] += 1
    return table


def class_rows(cls: ClassFolder, test_names: set[str], val_names: set[str] | None, val_fraction: float,
               seed: int, raw_root) -> tuple[list[dict], list[dict], dict]:
    """The test rows, train rows and the report entry of one class; `val_names` None: hold out at random."""
    test = [n for n in cls.images if n in test_names]
    train = [n for n in cls.images if n not in test_names]
    if not test or not train:
        raise UserError(
            f"class {cls.name!r} has {len(cls.images)} images: the split leaves {len(test)} for test and "
            f"{len(train)} for training. Add images or change data.test_fraction (or data.max_per_class, "
            "data.split)"
        )
    val = hold_out(train, val_fraction, seed, cls.label) if val_names is None else val_names
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


def group_report(rows: list[dict], groups: dict[tuple[str, str], str], test_fraction: float,
                 grouped: bool) -> dict:
    """Each group's image count per split (or, past GROUPS_LISTED groups, a summary), the groups found in
    more than one split, and the warnings: a group big enough for a test image that has none."""
    table: dict[str, dict[str, int]] = {}
    for r in rows:
        subset = r["subset"] if r["subset"] in ("test", "val") else "train"
        per = table.setdefault(groups[(r["class"], r["filename"])], {"test": 0, "train": 0, "val": 0})
        per[subset] += 1
    straddling = sorted(g for g, per in table.items() if sum(v > 0 for v in per.values()) > 1
                        and (per["test"] > 0))  # test vs the rest: what a leak is
    missing = [] if grouped else sorted(g for g, per in table.items()
                                        if per["test"] == 0 and sum(per.values()) * test_fraction >= 1)
    out: dict = {"count": len(table), "in_test_and_training": len(straddling) if not grouped else 0}
    if len(table) <= GROUPS_LISTED:
        out["per_group"] = dict(sorted(table.items()))
    else:
        out["per_split"] = {s: sum(per[s] > 0 for per in table.values()) for s in ("test", "train", "val")}
    out["missing_from_test"] = missing
    return out


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
    if data.max_per_class:
        for cls in classes:
            cls.images = cls.images[: data.max_per_class]
    groups = None
    if data.group_by:  # a group is a property of the file name (or its row in the table), whatever its class
        found = groups_of(sorted({n for c in classes for n in c.images}), data.group_by, paths.RAW)
        groups = {(c.name, n): found[n] for c in classes for n in c.images}
    test_names, val_names = choose_test_and_val(classes, data, groups)
    test_rows, train_rows = [], []
    report: dict = {"classes": {}, "ignored_files": 0, "bad_images": len(bad), "bad_image_files": bad}
    ignored: dict[str, int] = {}  # files in class folders that are not images, by suffix
    for cls in classes:
        name, folder = cls.name, cls.folder
        val_fraction = 0.0 if data.folds else data.val_fraction  # folds replace the hold-out
        test, train, entry = class_rows(cls, test_names[name], val_names and val_names[name], val_fraction,
                                        data.seed, paths.RAW)
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
        report["folds"] = cut_into_folds(train_rows, data.folds, data.seed,
                                         [groups[(r["class"], r["filename"])] for r in train_rows]
                                         if groups and data.split == "grouped" else None)
        for entry in report["classes"].values():
            del entry["train"]["of_which_val"]  # no hold-out: every training image is in one fold
        del report["total"]["of_which_val"]
    report["split"] = {"how": data.split, "group_by": data.group_by}
    if groups:
        report["groups"] = group_report(test_rows + train_rows, groups, data.test_fraction,
                                        data.split == "grouped")
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
    if groups:
        g = report["groups"]
        print(f"split: {g['count']} groups (data.group_by {data.group_by!r}), "
              + (f"none in two splits ({data.split})" if data.split == "grouped"
                 else f"{g['in_test_and_training']} in both test and training ({data.split})"))
        if g["missing_from_test"]:
            print(f"split: warning: {len(g['missing_from_test'])} group(s) have no test image, e.g. "
                  f"{', '.join(map(repr, g['missing_from_test'][:5]))}: the test metrics say nothing about them. "
                  "Use data.split: random to draw the test set within each group, or grouped to test on whole "
                  "groups")


def choose_test_and_val(classes: list[ClassFolder], data: DataParams, groups: dict | None
                        ) -> tuple[dict[str, set[str]], dict[str, set[str]] | None]:
    """({class: its test images}, {class: its validation images} or None: drawn per class by `hold_out`)."""
    if data.split != "grouped":
        return ({c.name: draw_test(c, data.split, data.test_fraction, data.seed,
                                   {n: groups[(c.name, n)] for n in c.images} if groups else None)
                 for c in classes}, None)

    def first_part(rows: list[tuple[str, int, str]], fraction: float, key: str) -> dict[str, set[str]]:
        part = group_parts([label for _, label, _ in rows], [groups[(c, n)] for c, _, n in rows],
                           parts_for(fraction), data.seed, key)
        chosen: dict[str, set[str]] = {c.name: set() for c in classes}
        for (c, _, n), p in zip(rows, part):
            if p == 0:
                chosen[c].add(n)
        return chosen

    rows = [(c.name, c.label, n) for c in classes for n in c.images]
    test = first_part(rows, data.test_fraction, "data.test_fraction")
    if data.folds or data.val_fraction == 0:
        return test, {c.name: set() for c in classes}
    return test, first_part([r for r in rows if r[2] not in test[r[0]]], data.val_fraction, "data.val_fraction")
