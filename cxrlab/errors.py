"""User-facing errors and the entry point every stage runs through.

A mistake the user can fix (a wrong param, a missing folder, no network) is
raised as `UserError`: the stage prints one line naming the thing and the fix,
exits with status 2 and shows no traceback. So do a full disk and a file or
folder the stage may not write (read-only, wrong owner), naming the path.
Anything else is a bug and keeps its traceback. SIGTERM is handled like
Ctrl-C (SIGINT) in every stage: worker processes are ended, the interruption
unwinds through the atomic writes (which remove their temporaries) and the
stage exits 143 (130 for Ctrl-C) with one line.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix; its message says what and how."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a scheduler's or container's stop): unwinds exactly like Ctrl-C, so every
    `finally` and `except BaseException` that cleans up after an interruption runs for it too."""


_owner: int | None = None  # the process that installed the handlers (its forked workers inherit them)


def _on_signal(signum: int, frame) -> None:
    """SIGINT and SIGTERM in a stage: end its worker processes, then unwind as an interruption.

    Pool workers (ProcessPoolExecutor, DataLoader) are ended first: a signal sent to the stage alone
    (`kill <pid>`, unlike Ctrl-C in a terminal, which reaches the whole process group) would otherwise
    leave them running, and the pool's shutdown would wait for all their work before the temporary
    output folders could be removed. A worker forked from the stage inherits this handler and acts as
    if it had none. A second SIGTERM while cleaning up is ignored, so the cleanup finishes.
    """
    if os.getpid() != _owner:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end_workers()
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def end_workers(grace_s: float = 5.0) -> None:
    """SIGTERM this process's children (pool workers, a torchrun launcher, which passes it on to its
    ranks); SIGKILL those still running after `grace_s`. Multiprocessing children are reaped here; others
    are left for their own `Popen` to reap."""
    pool = {p.pid: p for p in multiprocessing.active_children()}
    pids = _child_pids() | set(pool)
    for pid in pids:
        _send(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (running := [pid for pid in pids if _running(pid, pool)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in running:
        _send(pid, signal.SIGKILL)
    for child in pool.values():
        child.join(grace_s)


def _child_pids() -> set[int]:
    """This process's child processes, from /proc (Linux); empty where that is not available."""
    pids: set[int] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(pid) for pid in f.read().split())
    except OSError:
        pass
    return pids


def _running(pid: int, pool: dict) -> bool:
    if pid in pool:
        return pool[pid].is_alive()  # polls, and reaps an ended worker
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # not yet ended
    except (OSError, IndexError):
        return False


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:  # already gone
        pass


@contextlib.contextmanager
def signals_handled() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT end this process's workers and unwind as an interruption
    (`_on_signal`); the previous handlers come back after."""
    global _owner
    _owner = os.getpid()
    before = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def run_stage(main: Callable[[Sequence[str] | None], object], name: str) -> None:
    """Run a stage's `main(argv)`, turning a `UserError` into one line and exit 2.

    While it runs, the params `dvc.yaml` lists for the stage are watched: an
    output about to be written after one of them changed stops the stage
    (`cxrlab.config.guard`).
    """
    from cxrlab.config import guard  # here: guard itself raises UserError

    try:
        guard.watch(name, sys.argv[1:])
        with signals_handled():
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
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (`Terminated`): workers ended, temporaries removed
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"error: {name}: {how}; nothing was recorded as complete", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT))
    finally:
        guard.unwatch()
