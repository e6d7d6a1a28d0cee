"""Stage `ensemble@<name>`: combine trained variants by voting and evaluate the result like a variant.

The behaviour lives in `cxrlab.evaluation.ensemble.evaluate_ensemble`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.evaluation.ensemble import evaluate_ensemble


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ensemble", help="a key of `ensembles` in params.yaml")
    args = parser.parse_args(argv)
    evaluate_ensemble(args.ensemble, load_params())


if __name__ == "__main__":
    run_stage(main, "ensemble")
