"""Groups of images for the split: a patient or a source (hospital, scanner) each image belongs to.

`data.group_by` names them two ways:

- `regex:<pattern>`: the first capture group (or, without one, the whole match) of `pattern` searched in
  the file name. `regex:^([A-Z]+)_` puts Shenzhen's `CHNCXR_0001_0.png` in `CHNCXR` and Montgomery's
  `MCUCXR_0001_0.png` in `MCUCXR`; `regex:^(\\d+)_` takes a patient number in front of the name.
- `csv:<file>:<image column>:<group column>`: a table shipped with the dataset (a path under the
  download, `data/raw`), one row per image; e.g. NIH ChestX-ray14's
  `csv:Data_Entry_2017.csv:Image Index:Patient ID`.

The split stage then keeps each group whole (`data.split: grouped`) or draws the test set within each
group (`data.split: random`), and reports every group's share of each split (cxrlab.data.split).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from cxrlab.config.names import parse_group_by
from cxrlab.errors import UserError


def groups_of(names: list[str], spec: str, raw_root: Path) -> dict[str, str]:
    """{file name: group} for every name in `names`; one line naming the files no group is found for."""
    kind, args = parse_group_by(spec)
    if kind == "regex":
        pattern = re.compile(args[0])
        found = {}
        for name in names:
            m = pattern.search(name)
            if m:
                found[name] = m.group(1) if pattern.groups else m.group(0)
    else:
        found = _from_table(raw_root, *args)
        found = {n: found[n] for n in names if n in found}
    missing = [n for n in names if not found.get(n)]
    if missing:
        raise UserError(f"data.group_by {spec!r} finds no group for {len(missing)} of {len(names)} images, e.g. "
                        f"{', '.join(repr(n) for n in missing[:3])}; fix the pattern or the table, "
                        "or set data.group_by: null")
    return found


def _from_table(raw_root: Path, file: str, image_col: str, group_col: str) -> dict[str, str]:
    path = (raw_root / file).resolve()
    if not path.is_relative_to(raw_root.resolve()) or not path.is_file():
        raise UserError(f"data.group_by: {file!r} is not a file under {raw_root} (the downloaded dataset); "
                        "name the table by its path inside the dataset")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for col in (image_col, group_col):
            if col not in (reader.fieldnames or []):
                raise UserError(f"data.group_by: {path} has no column {col!r}; its columns are "
                                f"{reader.fieldnames}")
        return {Path(row[image_col]).name: row[group_col].strip() for row in reader}


def apportion(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split `total` over groups in proportion to `sizes` (largest remainders, ties by name), never more
    than a group holds. What sklearn's StratifiedShuffleSplit does internally (`_approximate_mode`, private);
    its public `train_test_split(stratify=...)` refuses a stratum of one image, which a patient often is."""
    n = sum(sizes.values())
    exact = {g: total * s / n for g, s in sizes.items()}
    share = {g: min(int(v), sizes[g]) for g, v in exact.items()}
    order = sorted(sizes, key=lambda g: (-(exact[g] - int(exact[g])), g))
    left = total - sum(share.values())
    while left > 0:
        progressed = False
        for g in order:
            if left and share[g] < sizes[g]:
                share[g] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return share
