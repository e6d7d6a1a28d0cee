"""Apply a named study configuration from `studies/` to params.yaml.

    python -m cxrlab.cli.study --list
    python -m cxrlab.cli.study covid4_transfer
    dvc exp run -n covid4 -S data.source=/data/chest-xray-4class

A study file is a partial params.yaml. It replaces `experiments` and
`ensembles` as a whole (a study brings its own variants) and sets each key
it names in the other sections, leaving the rest of params.yaml, comments
included, as it was. The result is validated before params.yaml is written;
`git checkout params.yaml` goes back.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Sequence

from cxrlab.config.load import PARAMS_FILE, load_params
from cxrlab.config.studies import apply, available, description, read_study
from cxrlab.errors import UserError, run_stage
from cxrlab.io.fsio import atomic_file


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a file of studies/ without .yaml")
    parser.add_argument("--list", action="store_true", help="list the studies with their descriptions")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        width = max(60, shutil.get_terminal_size().columns - 25)
        for name in available():
            lines = textwrap.wrap(description(name), width) or [""]
            print(f"{name:24s} {lines[0]}", *(f"{'':24s} {line}" for line in lines[1:]), sep="\n")
        return

    overlay = read_study(args.name)
    params = Path(PARAMS_FILE)
    if not params.is_file():
        raise UserError(f"{params} not found; run this from the repository root")
    text = apply(overlay, params.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / PARAMS_FILE
        candidate.write_text(text)
        try:
            load_params(candidate)
        except UserError as err:
            raise UserError(f"study {args.name} does not give valid params:\n{err}") from None
    with atomic_file(params) as tmp_file:
        Path(tmp_file).write_text(text)
    variants = ", ".join(overlay.get("experiments", {}))
    print(f"study {args.name}: applied to {params} (variants {variants}); "
          f"now point data.source at the data and run, e.g.\n"
          f"  dvc exp run -n {args.name} -S data.source=/path/to/folder-per-class-data\n"
          f"`git checkout {params}` undoes it.")


def run() -> None:
    """The `cxr-study` console script: a mistake the user can fix is one line, not a traceback."""
    run_stage(main, "study")


if __name__ == "__main__":
    run()
