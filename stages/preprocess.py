"""Stage `preprocess`: decode and resize every image once, at `data.image_size`.

The behaviour lives in `cxrlab.data.preprocess.preprocess`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.data.preprocess import preprocess
from cxrlab.errors import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    preprocess(load_params().data)


if __name__ == "__main__":
    run_stage(main, "preprocess")
