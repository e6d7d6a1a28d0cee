"""Stage `split`: the study's per-class split by ID, plus a validation hold-out.

The behaviour lives in `cxrlab.data.split.split_dataset`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.data.split import split_dataset
from cxrlab.errors import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    split_dataset(load_params().data)


if __name__ == "__main__":
    run_stage(main, "split")
