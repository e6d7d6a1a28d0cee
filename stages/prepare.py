"""Stage `prepare`: copy the images listed by the split into dataset folders.

`data/dataset/<train|test>/<class>/<filename>`, as in the study. Files are
hard-linked where the file system allows, so the copy costs no disk space.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from tqdm import tqdm

from cxrlab import paths
from cxrlab.config.load import load_params
from cxrlab.errors import UserError, run_stage
from cxrlab.io.fsio import atomic_dir, check_writable, link_or_copy
from cxrlab.io.records import read_rows


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    load_params()  # fail on a wrong params.yaml before any work
    check_writable(paths.DATASET)
    splits = {"train": read_rows(paths.TRAIN_CSV), "test": read_rows(paths.TEST_CSV)}
    with atomic_dir(paths.DATASET) as tmp:
        for split, rows in splits.items():
            for cls in sorted({r["class"] for r in rows}):
                (tmp / split / cls).mkdir(parents=True)
            for r in tqdm(rows, desc=f"prepare {split}", unit="img", mininterval=2):
                src = paths.RAW / r["path"]
                if not src.is_file():
                    raise UserError(f"{src} is listed in {paths.SPLIT} but missing; "
                                    "run the pipeline from the download stage (dvc repro -f download)")
                link_or_copy(src, tmp / split / r["class"] / r["filename"])
    print(f"prepare: {sum(map(len, splits.values()))} images in {paths.DATASET}/<split>/<class>")


if __name__ == "__main__":
    run_stage(main, "prepare")
