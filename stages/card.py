"""Stage `card@<variant>`: the variant's model card, cards/<variant>.md, every number read from stage outputs.

The behaviour lives in `cxrlab.reports.card.write_card`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.reports.card import write_card


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", help="a key of `experiments` in params.yaml")
    args = parser.parse_args(argv)
    write_card(args.variant, load_params())


if __name__ == "__main__":
    run_stage(main, "card")
