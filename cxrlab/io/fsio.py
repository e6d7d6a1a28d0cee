"""Writing outputs so that a crash never leaves a half-written file or folder.

Every stage writes to a temporary sibling and renames it into place only once
it is complete; a killed stage leaves at most a `.tmp-*` sibling, which the
next run removes. A full disk while writing names the output, not the
temporary; `check_writable` lets a stage find a read-only output folder
before its long work rather than after.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cxrlab.errors import UserError

TMP_MARK = ".tmp-"
FULL = (errno.ENOSPC, errno.EDQUOT)

# Run before anything is renamed into place; one raising stops the write (and the
# stage) with nothing published. `cxrlab.config.guard` adds its params check here.
_publish_checks: list[Callable[[], None]] = []


def before_publish(check: Callable[[], None]) -> None:
    """Run `check()` before every atomic write takes its place."""
    if check not in _publish_checks:
        _publish_checks.append(check)


def _checked() -> None:
    for check in _publish_checks:
        check()


def _clean_stale(target: Path) -> None:
    """Remove temporaries a killed earlier run left beside `target`."""
    if not target.parent.is_dir():
        return
    for stale in target.parent.glob(f"{target.name}{TMP_MARK}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `path` in one rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=target.name + TMP_MARK, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _checked()
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        if err.errno in FULL and _inside(err, tmp_path):  # name the output, not its temporary
            raise OSError(err.errno, os.strerror(err.errno), str(target)) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it takes the place of `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    tmp_path = Path(tempfile.mkdtemp(prefix=target.name + TMP_MARK, dir=target.parent))
    try:
        yield tmp_path
        _checked()
        remove(target)
        os.replace(tmp_path, target)
    except OSError as err:
        shutil.rmtree(tmp_path, ignore_errors=True)
        if err.errno in FULL and _inside(err, tmp_path):
            raise OSError(err.errno, os.strerror(err.errno), str(target)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise


def _inside(err: OSError, tmp: Path) -> bool:
    """Whether the error happened writing the temporary `tmp` or a file in it (or where is not known).
    A copy's error names its source first (`shutil.copy2` sets filename to the source, filename2 to
    the destination)."""
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return not names or any(n == str(tmp) or n.startswith(str(tmp) + os.sep) for n in names)


def check_writable(*outputs: str | os.PathLike) -> None:
    """Raise `UserError` naming the first of `outputs` (files or folders) that cannot be written.

    An output is written as a temporary beside it, renamed into place, so the
    folder that will hold it must take a new file: it (or, where it does not
    exist yet, the nearest existing folder above it, where it will be made)
    is probed by creating and removing an empty file. An existing output
    folder is probed too, since replacing it deletes what is inside. Nothing
    is left behind. A full disk is not found this way (an empty file still
    fits); `run_stage` reports one when writing fails.
    """
    for output in outputs:
        target = Path(output)
        probes = [target.parent] + ([target] if target.is_dir() and not target.is_symlink() else [])
        for folder in probes:
            existing = folder
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir():
                raise UserError(f"cannot write {target}: {existing} is a file, not a folder; move it away")
            try:
                fd, probe = tempfile.mkstemp(prefix=".write-check" + TMP_MARK, dir=existing)
                os.close(fd)
                os.unlink(probe)
            except OSError as err:
                raise UserError(f"cannot write {target}: {existing} is not writable ({err.strerror}); make it "
                                "writable (chmod u+w, or a writable disk) and run again") from None


def remove(path: str | os.PathLike) -> None:
    """Delete a file, link or folder if it exists."""
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(data), indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link `src` to `dst` (no extra disk), or copy where links can't go."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# The ioctl that makes `dst` share `src`'s blocks, copy-on-write (Linux <linux/fs.h>: _IOW(0x94, 9, int)).
# Python 3.11's shutil never reflinks, hence this call.
FICLONE = 0x40049409


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to the new file `dst`: a reflink where the file system has them (Btrfs, XFS: no extra
    disk, and writing either file leaves the other as it was), else a plain copy. Never a hard link, so
    nothing done to `dst` (DVC making it read-only, say) reaches `src`. `dst` gets the default mode."""
    with open(src, "rb") as source, open(dst, "xb") as target:
        try:
            fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
            return
        except OSError:  # no reflinks here (ext4, tmpfs), or another disk: copy the bytes
            pass
        shutil.copyfileobj(source, target, 1 << 20)
