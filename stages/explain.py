"""Stage `explain@<variant>`: Grad-CAM heatmaps over test images, by kind of outcome.

The behaviour lives in `cxrlab.explain.gallery.explain_variant`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.explain.gallery import explain_variant


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", help="a key of `experiments` in params.yaml")
    args = parser.parse_args(argv)
    explain_variant(args.variant, load_params())


if __name__ == "__main__":
    run_stage(main, "explain")
