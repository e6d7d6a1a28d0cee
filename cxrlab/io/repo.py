"""The repository a stage runs for, so relative paths in params.yaml mean one folder everywhere.

DVC runs a stage in the repository root, but `dvc exp run --temp` and
`--queue` run it in a copy made in <repository>/.dvc/tmp/exps/<random>/
(dvc.repo.experiments.executor.local), where a relative `data.source` that
is not tracked by git (a dataset beside the code) would not exist.
"""

from __future__ import annotations

from pathlib import Path

_EXPERIMENT_COPIES = (".dvc", "tmp", "exps")


def repo_root(cwd: Path | None = None) -> Path:
    """The current folder, or in an experiment's temporary copy the repository it copies."""
    here = (cwd or Path.cwd()).absolute()
    parts, n = here.parts, len(_EXPERIMENT_COPIES)
    for i in range(len(parts) - n, 0, -1):
        if parts[i:i + n] == _EXPERIMENT_COPIES:
            return Path(*parts[:i])
    return here


def repo_path(path: Path, cwd: Path | None = None) -> Path:
    """`path` from params.yaml: an absolute one as it is, a relative one under `repo_root`."""
    return path if path.is_absolute() else repo_root(cwd) / path
