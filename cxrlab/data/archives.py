"""Unpacking a zip or tar archive of images, safely, with this project's own code.

Every entry is checked before anything is written: only regular files and
folders, names that stay inside the destination (no absolute paths, drive
letters or `..`), no links of any kind, no entry twice, no overlapping zip
members. Then each file is written by us (never `extractall`, never the
Python version's tarfile filter, which on Python 3.11.7 lacks the 2025
fixes) into folders we create, counting bytes against the declared size, a
compression-ratio bound and `data.max_unpacked_gb`.
"""

from __future__ import annotations

import functools
import io
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from cxrlab.errors import UserError

CHUNK = 1 << 20

# ---------------------------------------------------------------- archives
# Bounds on unpacking, beside the total of `data.max_unpacked_gb`. Images are
# stored compressed (PNG, JPEG: they shrink by a few percent at most in an
# archive) or compress a few times (BMP, uncompressed TIFF, DICOM), so a member
# that inflates more than MAX_RATIO times its compressed size is not an image
# but a zip bomb. Members under RATIO_FLOOR bytes are exempt: small files
# (lists, empty or flat images) may compress very well and cost nothing.
MAX_RATIO = 100
RATIO_FLOOR = 1 << 20
# Entries (files and folders) an archive may hold. Each costs an inode and a
# file-system block however small, so 300,000 empty entries take some 400 MB
# and 300,000 inodes while declaring 0 bytes. The largest public chest X-ray
# archives in one piece hold about 112,000 images (NIH ChestX-ray14); a larger
# dataset can be unpacked by hand and given as a folder, which has no limit.
MAX_ENTRIES = 250_000


@dataclass(frozen=True)
class _Member:
    """An archive entry that passed the checks: a file or folder at `path` under the target."""

    path: PurePosixPath
    is_dir: bool
    size: int  # bytes it declares once unpacked
    compressed: int | None  # bytes it takes in the archive (zip), None where unknown (tar)
    ref: object  # the ZipInfo / TarInfo


class _Counting(io.FileIO):
    """A file that counts the bytes read from it: the compressed bytes behind a tar member."""

    consumed = 0

    def readinto(self, buffer) -> int | None:
        n = super().readinto(buffer)
        self.consumed += n or 0
        return n

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.consumed += len(data)
        return data


def extract_archive(archive: Path, target: Path, max_bytes: int) -> None:
    """Unpack a zip or tar archive into the empty folder `target`, or refuse it.

    Every entry is checked before anything is written: a symbolic or hard
    link, a device or other special file, an absolute path, a drive letter, a
    `..` component, a name used twice, an encrypted zip member or more
    declared bytes than `max_bytes` (or than the disk has free) refuse the
    whole archive. Then each file is copied by this code, not by tarfile's or
    zipfile's extraction (so nothing relies on the Python version's tarfile
    filter): into folders it made itself (and which therefore hold no links),
    created with O_EXCL | O_NOFOLLOW, while counting bytes so that a member
    writing more than it declared, inflating more than MAX_RATIO times, or a
    running total past `max_bytes`, stops the extraction. On a refusal
    `target` may hold part of the archive; the caller removes it (the download
    stage builds in a temporary folder).
    """
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, target, max_bytes)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, target, max_bytes)
        else:
            raise UserError(f"{archive} is neither a zip nor a tar archive; "
                            "data.source must be a folder, a .zip or a .tar(.gz/.bz2/.xz)")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as err:
        raise UserError(f"archive {archive.name} is damaged ({type(err).__name__}: {err}); "
                        "nothing was kept. Download it again or check the source") from None
    except UnicodeDecodeError as err:  # a zip member flagged as UTF-8 whose name is not
        raise UserError(f"archive {archive.name} has an entry name flagged as UTF-8 that is not ({err.object[:60]!r}); "
                        "nothing was extracted. Repack it with UTF-8 names") from None
    except NotImplementedError as err:  # a zip compression method this Python lacks
        raise UserError(f"archive {archive.name}: {err}; nothing was kept. Repack it as a plain zip "
                        "(deflate) or a tar") from None
    except OSError as err:
        if err.errno is not None:  # a system error (a full disk, permissions): not the archive's fault
            raise
        raise UserError(f"archive {archive.name} is damaged ({err}); nothing was kept. "
                        "Download it again or check the source") from None


def _unsafe_name(name: str) -> str | None:
    """Why the member name `name` would leave the target folder, or None."""
    if not name:
        return None
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "'..' in the path"
    return None


def shown_name(name: str) -> str:
    """`name` printable: bytes that are not UTF-8 (kept by Python as surrogates) as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def name_problem(rel: str, target: Path) -> str | None:
    """Why the relative path `rel` cannot be written under `target` as it is, or None: a name that is not
    UTF-8 (later stages write names into CSV files and reports) or longer than the file system allows."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "a name that is not UTF-8: rename it (e.g. convmv -f latin1 -t utf8)"
    name_max = _pathconf(target, "PC_NAME_MAX", 255)
    long = next((p for p in PurePosixPath(rel).parts if len(os.fsencode(p)) > name_max), None)
    if long is not None:
        return f"a name of {len(os.fsencode(long))} bytes, over the file system's {name_max}: shorten it"
    path_max = _pathconf(target, "PC_PATH_MAX", 4096)
    if len(os.fsencode(os.path.abspath(target / rel))) >= path_max:
        return f"a path over the file system's {path_max} bytes: shorten it"
    return None


@functools.lru_cache(maxsize=16)  # asked once per entry, of the same folder
def _pathconf(path: Path, name: str, default: int) -> int:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return os.pathconf(existing, name)
    except (OSError, ValueError):
        return default


def _member_path(name: str) -> PurePosixPath:
    """The relative path a (safe) member name stands for: `./a//b/` -> `a/b`; `\\` is a separator too."""
    return PurePosixPath(*PurePosixPath(name.replace("\\", "/")).parts)


def _short(text: str, keep: int = 60) -> str:
    """`text`, its middle elided when long (a hostile name may be thousands of characters)."""
    return text if len(text) <= keep else f"{text[:keep // 2]}...{text[-keep // 2:]}"


def _refuse(archive: Path, problems: list[tuple[str, str]]) -> None:
    shown = ", ".join(f"{_short(shown_name(name))!r} ({_short(why, 100)})" for name, why in problems[:5])
    more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
    noun = "an unsafe entry" if len(problems) == 1 else f"{len(problems)} unsafe entries"
    raise UserError(f"archive {archive.name} has {noun}: {shown}{more}; nothing was extracted. A dataset of "
                    "images needs no links, special files or paths outside its folder, and names the disk can "
                    "hold: use an archive from a trusted source, or fix the names and repack it")


def _plan(archive: Path, entries: list[tuple[str, str | None, object, int, int | None]],
          target: Path, max_bytes: int) -> list[_Member]:
    """Check every entry (name, why it is refused or None, ref, size, compressed size) up front."""
    problems: list[tuple[str, str]] = []
    members: list[_Member] = []
    files: dict[PurePosixPath, str] = {}
    dirs: set[PurePosixPath] = set()
    for name, why, ref, size, compressed in entries:
        why = _unsafe_name(name) or why or name_problem(str(_member_path(name)), target)
        if why:
            problems.append((name, why))
            continue
        path = _member_path(name)
        if not path.parts:
            continue  # the archive's own root folder
        is_dir = isinstance(ref, zipfile.ZipInfo) and ref.is_dir() or isinstance(ref, tarfile.TarInfo) and ref.isdir()
        if is_dir:
            dirs.add(path)
        elif path in files:
            problems.append((name, "a second file of the same name"))
            continue
        else:
            files[path] = name
        if compressed is not None and size > RATIO_FLOOR and size > MAX_RATIO * max(compressed, 1):
            problems.append((name, f"{size} bytes compressed into {compressed}, over {MAX_RATIO}:1: "
                                   "not an image but a zip bomb"))
            continue
        members.append(_Member(path, is_dir, size, compressed, ref))
    for path, name in files.items():
        if path in dirs:
            problems.append((name, "both a file and a folder"))
        elif clash := next((str(p) for p in path.parents if p in files), None):
            problems.append((name, f"inside {clash!r}, which is a file"))
    if problems:
        _refuse(archive, problems)
    total = sum(m.size for m in members)
    if total > max_bytes:
        raise UserError(f"archive {archive.name} unpacks to {_gb(total)}, more than data.max_unpacked_gb "
                        f"({_gb(max_bytes)}); nothing was extracted. Raise data.max_unpacked_gb in params.yaml "
                        "if the dataset is really that large")
    free = shutil.disk_usage(target).free
    if total > free:
        raise UserError(f"archive {archive.name} unpacks to {_gb(total)} but only {_gb(free)} are free on the "
                        f"disk of {target.parent}; nothing was extracted. Free some space and run again")
    return members


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


class _Budget:
    """The running count of unpacked bytes against `data.max_unpacked_gb`."""

    def __init__(self, archive: Path, max_bytes: int):
        self.archive, self.max_bytes, self.total = archive, max_bytes, 0

    def add(self, n: int) -> None:
        self.total += n
        if self.total > self.max_bytes:
            raise UserError(f"archive {self.archive.name} unpacks to more than data.max_unpacked_gb "
                            f"({_gb(self.max_bytes)}); extraction stopped and nothing was kept. Raise "
                            "data.max_unpacked_gb in params.yaml if the dataset is really that large")


def _make_dirs(root: Path, rel: PurePosixPath, made: set[PurePosixPath]) -> None:
    """Create root/rel folder by folder. They are all made here, so none is a link."""
    for part in reversed((rel, *rel.parents)):
        if part in made or not part.parts:
            continue
        path = root / part
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):  # cannot happen: the plan refuses such names
                raise UserError(f"archive entry {str(part)!r} is both a file and a folder; nothing was kept") from None
        made.add(part)


def _unpack(archive: Path, target: Path, members: list[_Member], open_member, budget: _Budget,
            consumed=None) -> None:
    """Write `members` under `target`. `consumed()`, where given, counts the compressed bytes read so far."""
    made: set[PurePosixPath] = set()
    for m in tqdm(members, desc=f"extract {archive.name}", unit="file"):
        if m.is_dir:
            _make_dirs(target, m.path, made)
            continue
        _make_dirs(target, m.path.parent, made)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(target / m.path, flags, 0o644)
        start = consumed() if consumed else 0
        written = 0
        with os.fdopen(fd, "wb") as out, open_member(m) as stream:
            while chunk := stream.read(CHUNK):
                written += len(chunk)
                if written > m.size:
                    raise UserError(f"archive {archive.name}: entry {str(m.path)!r} unpacks to more than the "
                                    f"{m.size} bytes it declares; extraction stopped and nothing was kept")
                packed = consumed() - start if consumed else m.compressed
                if written > RATIO_FLOOR and packed is not None and written > MAX_RATIO * max(packed, 1):
                    raise UserError(f"archive {archive.name}: entry {str(m.path)!r} inflates more than "
                                    f"{MAX_RATIO}:1 (not an image but a zip bomb); extraction stopped and "
                                    "nothing was kept. Use an archive from a trusted source")
                budget.add(len(chunk))
                out.write(chunk)


def _too_many(archive: Path, held: str) -> None:
    raise UserError(f"archive {archive.name} holds {held} entries, over the {MAX_ENTRIES:,} a dataset archive may "
                    "hold (each costs an inode and a disk block however small); nothing was extracted. Unpack it "
                    "yourself and point data.source at the folder")


def _extract_zip(archive: Path, target: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_ENTRIES:
            _too_many(archive, f"{len(infos):,}")
        entries = [(info.filename, _zip_refusal(info), info, info.file_size, info.compress_size) for info in infos]
        entries += _zip_overlaps(infos)
        members = _plan(archive, entries, target, max_bytes)
        _unpack(archive, target, members, lambda m: zf.open(m.ref), _Budget(archive, max_bytes))


def _zip_refusal(info: zipfile.ZipInfo) -> str | None:
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "device or special file"
    if info.flag_bits & 0x1:
        return "encrypted"
    return None


def _zip_overlaps(infos: list[zipfile.ZipInfo]) -> list[tuple[str, str, None, int, None]]:
    """Members whose data overlaps the next member's (the overlapping-file zip bomb)."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    return [(a.filename, f"its data overlaps {b.filename!r}: a zip bomb", None, 0, None)
            for a, b in zip(ordered, ordered[1:])
            if a.header_offset + 30 + a.compress_size > b.header_offset]  # 30: the local header's fixed part


def _extract_tar(archive: Path, target: Path, max_bytes: int) -> None:
    with _Counting(archive) as raw, tarfile.open(fileobj=raw, mode="r:*") as tf:
        infos = []
        for info in tf:  # read entry by entry: a bomb of entries is refused at the first one too many
            infos.append(info)
            if len(infos) > MAX_ENTRIES:
                _too_many(archive, f"more than {MAX_ENTRIES:,}")
        entries = [(m.name, _tar_refusal(m), m, m.size if m.isreg() else 0, None) for m in infos]
        members = _plan(archive, entries, target, max_bytes)
        _unpack(archive, target, members, lambda m: tf.extractfile(m.ref), _Budget(archive, max_bytes),
                consumed=lambda: raw.consumed)


def _tar_refusal(m: tarfile.TarInfo) -> str | None:
    if m.issym():
        return f"symbolic link to {m.linkname!r}"
    if m.islnk():
        return f"hard link to {m.linkname!r}"
    if not (m.isreg() or m.isdir()):
        return "device or special file"
    return None
