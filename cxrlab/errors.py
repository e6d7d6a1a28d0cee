"""User-facing errors and the entry point every stage runs through.

A mistake the user can fix (a wrong param, a missing folder, no network) is
raised as `UserError`: the stage prints one line naming the thing and the fix,
exits with status 2 and shows no traceback. So do a full disk and a file or
folder the stage may not write (read-only, wrong owner), naming the path.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix; its message says what and how."""


def run_stage(main: Callable[[Sequence[str] | None], object], name: str) -> None:
    """Run a stage's `main(argv)`, turning a `UserError` into one line and exit 2.

    While it runs, the params `dvc.yaml` lists for the stage are watched: an
    output about to be written after one of them changed stops the stage
    (`cxrlab.config.guard`).
    """
    from cxrlab.config import guard  # here: guard itself raises UserError

    try:
        guard.watch(name, sys.argv[1:])
        main(sys.argv[1:])
    except UserError as err:
        print(f"error: {name}: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and err.filename:
            print(f"error: {name}: {err.strerror}: {err.filename}; make it writable (or readable) and run "
                  "again. Partial outputs were removed", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: {name}: the disk is full{where}; free some space (or move the DVC cache with "
              "`dvc cache dir`) and run again. Partial outputs were removed", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"error: {name}: interrupted; nothing was recorded as complete", file=sys.stderr)
        sys.exit(130)
    finally:
        guard.unwatch()
