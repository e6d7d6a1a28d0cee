"""User-facing errors and the entry point every stage runs through.

A mistake the user can fix (a wrong param, a missing folder, no network) is
raised as `UserError`: the stage prints one line naming the thing and the fix,
exits with status 2 and shows no traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix; its message says what and how."""


def run_stage(main: Callable[[Sequence[str] | None], object], name: str) -> None:
    """Run a stage's `main(argv)`, turning a `UserError` into one line and exit 2."""
    try:
        main(sys.argv[1:])
    except UserError as err:
        print(f"error: {name}: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"error: {name}: interrupted; nothing was recorded as complete", file=sys.stderr)
        sys.exit(130)
