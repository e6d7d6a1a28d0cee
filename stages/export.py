"""Stage `export@<variant>`: each seed's best checkpoint as ONNX, with its preprocessing contract beside it.

The behaviour lives in `cxrlab.serving.export.export_variant`; nothing is trained.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.serving.export import export_variant


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", help="a key of `experiments` in params.yaml")
    args = parser.parse_args(argv)
    export_variant(args.variant, load_params())


if __name__ == "__main__":
    run_stage(main, "export")
