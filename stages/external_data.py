"""Stage `external_data@<set>`: fetch and preprocess one external test set (`external.<set>`), never split.

The behaviour lives in `cxrlab.data.external.prepare_external`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.data.external import prepare_external
from cxrlab.errors import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("set", help="a key of `external` in params.yaml")
    args = parser.parse_args(argv)
    prepare_external(args.set, load_params())


if __name__ == "__main__":
    run_stage(main, "external_data")
