"""Stage `flops`: parameters and compute of each variant's model, counted by thop.

The behaviour lives in `cxrlab.model.flops.count_variants`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.model.flops import count_variants


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    count_variants(load_params())


if __name__ == "__main__":
    run_stage(main, "flops")
