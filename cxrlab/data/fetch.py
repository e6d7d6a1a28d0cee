"""Getting a dataset onto disk: Kaggle, HTTP(S) archives, local folders and archives.

Each fetcher fills an empty folder it is given; the download stage builds
that folder beside `data/raw` and renames it into place only when complete.
Archives are checked member by member before anything is extracted: absolute
paths, `..` and links that leave the target folder are refused.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from cxrlab.data import demo
from cxrlab.errors import UserError
from cxrlab.io.fsio import link_or_copy
from cxrlab.io.repo import repo_path

KAGGLE_URL = "https://www.kaggle.com"
NETWORK_TIMEOUT_S = 15
CHUNK = 1 << 20
LOCAL_SOURCE_HINT = (
    "Without internet, get the dataset another way and point data.source at it: "
    "dvc exp run -S data.source=/path/to/folder-or-archive (or edit params.yaml)"
)


# ----------------------------------------------------------------- sources
def source_kind(source: str) -> str:
    """'demo', 'kaggle', 'http' or 'local', from the form of `data.source`."""
    if source == demo.SOURCE:
        return "demo"
    if source.startswith("kaggle:"):
        return "kaggle"
    if source.startswith(("http://", "https://")):
        return "http"
    return "local"


def fetch(source: str, target: Path, sha256: str | None, downloads: Path) -> str:
    """Fill the empty folder `target` from `source`; return a one-line description."""
    kind = source_kind(source)
    if kind == "demo":
        return demo.make_demo(target)
    if kind == "kaggle":
        return fetch_kaggle(source.removeprefix("kaggle:"), target)
    if kind == "http":
        archive = download_url(source, downloads, sha256)
        extract_archive(archive, target)
        if sha256 is None:
            archive.unlink(missing_ok=True)  # nothing to verify a re-use against
        return f"{source} -> {count_files(target)} files"
    return fetch_local(repo_path(Path(os.path.expanduser(source))), target, sha256)


def fetch_local(path: Path, target: Path, sha256: str | None) -> str:
    if not path.exists():
        raise UserError(
            f"data.source {str(path)!r} does not exist. Set data.source to a folder or "
            "a .zip/.tar archive holding the class folders, an http(s):// URL, or "
            "kaggle:<owner>/<dataset>"
        )
    if path.is_dir():
        if sha256:
            raise UserError("data.sha256 applies to archives, not to the folder "
                            f"{path}; set data.sha256 to null")
        copy_tree(path, target)
        return f"{path} -> {count_files(target)} files"
    if sha256:
        check_sha256(path, sha256, delete=False)
    extract_archive(path, target)
    return f"{path} -> {count_files(target)} files"


def fetch_kaggle(handle: str, target: Path) -> str:
    """Download a public Kaggle dataset through kagglehub (no account needed)."""
    parts = handle.split("/")
    if len(parts) not in (2, 4) or not all(parts) or (len(parts) == 4 and parts[2] != "versions"):
        raise UserError(
            f"data.source 'kaggle:{handle}' is not a Kaggle dataset handle; "
            "use kaggle:<owner>/<dataset> or kaggle:<owner>/<dataset>/versions/<n>"
        )
    require_network(KAGGLE_URL, f"kaggle:{handle}")
    import kagglehub  # imported here: only this source needs it

    try:
        path = Path(kagglehub.dataset_download(handle))
    except Exception as err:  # kagglehub raises many kinds; all mean "not downloaded"
        raise UserError(
            f"kagglehub could not download kaggle:{handle}: {err}. Check the handle on "
            f"kaggle.com, or: {LOCAL_SOURCE_HINT}"
        ) from None
    copy_tree(path, target)
    return f"kaggle:{handle} (kagglehub cache {path}) -> {count_files(target)} files"


def require_network(url: str, what: str) -> None:
    """Fail within seconds, with the way out, when `url` cannot be reached."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the server answered: the network is there
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot reach {url} to download {what} ({reason}). {LOCAL_SOURCE_HINT}") from None


# ------------------------------------------------------------- local copies
def copy_tree(src: Path, dst: Path) -> None:
    """Mirror `src` into the existing folder `dst`, hard-linking files where possible."""
    for folder, dirs, files in os.walk(src):
        rel = Path(folder).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            link_or_copy(Path(folder) / name, dst / rel / name)


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


# ----------------------------------------------------------------- http(s)
def download_url(url: str, downloads: Path, sha256: str | None) -> Path:
    """Download `url` into `downloads`, resuming a partial file; return the archive path.

    A file whose sha256 does not match is deleted and reported.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    final = downloads / f"{key}-{name}"
    part = final.with_name(final.name + ".part")

    if final.exists():
        if sha256 and file_sha256(final) == sha256.lower():
            return final  # a verified earlier download
        final.unlink()

    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url)
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to fetch, or a stale part: start over
            part.unlink()
            return download_url(url, downloads, sha256)
        raise UserError(f"downloading {url} failed: HTTP {err.code} {err.reason}; check the URL") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot download {url} ({reason}). {LOCAL_SOURCE_HINT}") from None

    with response:
        resumed = have and response.status == 206
        mode = "ab" if resumed else "wb"
        start = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else None
        with open(part, mode) as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, desc=f"download {name}"
        ) as bar:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, urllib.error.URLError) as err:
                raise UserError(
                    f"download of {url} broke off after {out.tell()} bytes ({err}); "
                    "run the stage again to resume"
                ) from None
    if total is not None and part.stat().st_size != total:
        raise UserError(
            f"download of {url} ended early ({part.stat().st_size} of {total} bytes); "
            "run the stage again to resume"
        )
    os.replace(part, final)
    if sha256:
        check_sha256(final, sha256, delete=True)
    return final


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, delete: bool) -> None:
    actual = file_sha256(path)
    if actual != expected.lower():
        if delete:
            path.unlink(missing_ok=True)
        raise UserError(
            f"sha256 of {path.name} is {actual}, but data.sha256 is {expected.lower()}"
            + ("; the file was deleted" if delete else "")
            + ". Check data.sha256 and the source"
        )


# ---------------------------------------------------------------- archives
def extract_archive(archive: Path, target: Path) -> None:
    """Extract a zip or tar archive into `target`, refusing members that leave it."""
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, target)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, target)
    else:
        raise UserError(f"{archive} is neither a zip nor a tar archive; "
                        "data.source must be a folder, a .zip or a .tar(.gz/.bz2/.xz)")


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


def _refuse(archive: Path, member: str, why: str) -> None:
    raise UserError(f"archive {archive.name} has an unsafe entry {member!r} ({why}); "
                    "nothing was extracted. Use an archive from a trusted source")


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            why = _unsafe_name(info.filename)
            if why:
                _refuse(archive, info.filename, why)
            if stat.S_ISLNK(info.external_attr >> 16):
                _refuse(archive, info.filename, "symbolic link")
        for info in tqdm(members, desc=f"extract {archive.name}", unit="file"):
            zf.extract(info, target)


def _extract_tar(archive: Path, target: Path) -> None:
    root = target.resolve()
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for m in members:
            why = _unsafe_name(m.name)
            if why:
                _refuse(archive, m.name, why)
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                _refuse(archive, m.name, "device or special file")
            if m.issym() or m.islnk():
                base = root if m.islnk() else (root / m.name).parent
                dest = (base / m.linkname).resolve()
                if _unsafe_name(m.linkname) == "absolute path" or not dest.is_relative_to(root):
                    _refuse(archive, m.name, f"link to {m.linkname!r} outside the folder")
        tf.extractall(target, members=tqdm(members, desc=f"extract {archive.name}", unit="file"),
                      filter="data")
