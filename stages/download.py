"""Stage `download`: put the dataset named by `data.source` into `data/raw`.

`data.source` is `kaggle:<owner>/<dataset>` (through kagglehub), an
`http(s)://` URL of a zip or tar archive (checked against `data.sha256` when
given, resumed when interrupted), or a local folder or archive. The files land
in a temporary folder that becomes `data/raw` only once complete; on any
refusal or failure it is removed, and so is a refused downloaded archive.
"""

from __future__ import annotations

import argparse
import errno
from typing import Sequence

from cxrlab import paths
from cxrlab.config.load import load_params
from cxrlab.data.fetch import fetch
from cxrlab.errors import UserError, run_stage
from cxrlab.io.fsio import atomic_dir, check_writable


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    data = load_params().data
    check_writable(paths.RAW, paths.DOWNLOADS)
    try:
        with atomic_dir(paths.RAW) as tmp:
            summary = fetch(data.source, tmp, data.sha256, paths.DOWNLOADS, int(data.max_unpacked_gb * 1e9))
            if not any(tmp.iterdir()):
                raise UserError(f"data.source {data.source!r} holds no files")
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"the disk is full while writing {err.filename or paths.RAW}; nothing was kept in "
                            f"{paths.RAW}. Free some space (a partial download is kept to resume) and run the "
                            "stage again") from None
        raise
    print(f"download: {summary} in {paths.RAW}")


if __name__ == "__main__":
    run_stage(main, "download")
