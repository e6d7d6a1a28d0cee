"""Stage `evaluate@<variant>`: score the best and last checkpoints of every seed on the test set.

The behaviour lives in `cxrlab.evaluation.evaluate.evaluate_variant`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.evaluation.evaluate import evaluate_variant


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", help="a key of `experiments` in params.yaml")
    args = parser.parse_args(argv)
    evaluate_variant(args.variant, load_params())


if __name__ == "__main__":
    run_stage(main, "evaluate")
