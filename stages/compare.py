"""Stage `compare`: is each variant really different from the reference (the baseline)?

The behaviour lives in `cxrlab.evaluation.compare.compare_all`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.evaluation.compare import compare_all


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    compare_all(load_params())


if __name__ == "__main__":
    run_stage(main, "compare")
