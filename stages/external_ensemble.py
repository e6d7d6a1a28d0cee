"""Stage `external_ensemble@<ensemble>-<set>`: score an ensemble
on an external test set, at the operating threshold chosen on internal validation.

The behaviour lives in `cxrlab.evaluation.external.evaluate_external`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.evaluation.external import evaluate_external


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a key of `ensembles` in params.yaml")
    parser.add_argument("set", help="a key of `external` in params.yaml")
    args = parser.parse_args(argv)
    evaluate_external(args.model, args.set, load_params())


if __name__ == "__main__":
    run_stage(main, "external_ensemble")
