"""Stage `plots`: compare the variants in figures, a table, and DVC plot data.

The behaviour lives in `cxrlab.reports.plots.make_plots`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.reports.plots import make_plots


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    make_plots(load_params())


if __name__ == "__main__":
    run_stage(main, "plots")
