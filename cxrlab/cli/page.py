"""Command `python -m cxrlab.cli.page`: the web page for trained models, on 127.0.0.1.

Starts Streamlit on `app/page.py` from the project root (where `params.yaml`,
`models/` and `metrics/` are), listening on 127.0.0.1 only unless
`--address` says otherwise, with no usage statistics sent and no browser
opened. The helpers below are what the page shows; they read the pipeline's
outputs and never write anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from cxrlab import paths
from cxrlab.config.load import load_params
from cxrlab.errors import UserError, run_stage
from cxrlab.serving.webapp import PAGE, command, trained_variants


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1",
                        help="where to listen (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8501)
    args = parser.parse_args(argv)
    params = load_params()  # from the project root: a wrong folder or params file fails here, not in the page
    if not trained_variants(params):
        raise UserError(f"no trained variant in {paths.MODELS}/; run `dvc repro` (or `dvc pull`) first")
    print(f"webapp: http://{args.address}:{args.port} (Ctrl+C stops it)", flush=True)
    code = str(PAGE.parents[1])  # the page imports stages.* from here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}
    os.execve(sys.executable, command(args.address, args.port), env)


def run() -> None:
    """The `cxr-page` console script: a mistake the user can fix is one line, not a traceback."""
    run_stage(main, "page")


if __name__ == "__main__":
    run()
