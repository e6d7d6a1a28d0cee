"""Getting a dataset onto disk: Kaggle, HTTP(S) archives, local folders and archives.

Each fetcher fills an empty folder it is given; the download stage builds
that folder beside `data/raw` and renames it into place only when complete,
and removes it on any failure. Archives are checked entry by entry before
anything is extracted and then unpacked by our own code (`cxrlab.data.archives`) within
size bounds (`extract_archive`); a downloaded archive that is refused is
deleted. A local folder's links are followed only to files inside it, and
its files are copied, never hard-linked (`copy_tree`). HTTP(S) downloads
resume, retry and time out as `cxrlab.data.web` describes.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cxrlab import paths
from cxrlab.data import demo, web
from cxrlab.data.archives import CHUNK, extract_archive, name_problem, shown_name
from cxrlab.data.web import LOCAL_SOURCE_HINT
from cxrlab.errors import UserError
from cxrlab.io.fsio import copy_file
from cxrlab.io.repo import repo_path, repo_root

KAGGLE_URL = "https://www.kaggle.com"
# The pipeline's own folders: a source inside one (or holding one) would feed outputs back in as data.
PIPELINE_FOLDERS = (paths.DATA, paths.MODELS, paths.METRICS, paths.PLOTS, paths.EXPLANATIONS, paths.TRAIN_STATE,
                    Path(".dvc"))


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


def fetch(source: str, target: Path, sha256: str | None, downloads: Path, max_bytes: int) -> str:
    """Fill the empty folder `target` from `source`; return a one-line description.

    `max_bytes` bounds what an archive may unpack to (and an HTTP download's size).
    """
    kind = source_kind(source)
    if kind == "demo":
        return demo.make_demo(target)
    if kind == "kaggle":
        return fetch_kaggle(source.removeprefix("kaggle:"), target)
    if kind == "http":
        archive = download_url(source, downloads, sha256, max_bytes)
        try:
            extract_archive(archive, target, max_bytes)
        except UserError as err:  # refused: a re-run must not find and re-use it
            archive.unlink(missing_ok=True)
            raise UserError(f"{err}. The download {archive} was deleted") from None
        if sha256 is None:
            archive.unlink(missing_ok=True)  # nothing to verify a re-use against
        return f"{source} -> {count_files(target)} files"
    return fetch_local(repo_path(local_path(source)), target, sha256, max_bytes)


def local_path(source: str) -> Path:
    """`data.source` as a path; `~` and `~user` are expanded."""
    path = os.path.expanduser(source)
    if path.startswith("~"):
        raise UserError(f"data.source {source!r}: cannot expand {source.split('/')[0]!r} (no such user or no "
                        "HOME); write the full path, e.g. /home/me/datasets/tbx11k")
    return Path(path)


def fetch_local(path: Path, target: Path, sha256: str | None, max_bytes: int) -> str:
    if not path.exists():
        raise UserError(
            f"data.source {str(path)!r} does not exist. Set data.source to a folder or "
            "a .zip/.tar archive holding the class folders, an http(s):// URL, or "
            "kaggle:<owner>/<dataset>"
        )
    if not (path.is_dir() or path.is_file()):
        raise UserError(f"data.source {str(path)!r} is neither a folder nor a regular file (a device, pipe or "
                        "socket); point data.source at a folder or a .zip/.tar archive of the class folders")
    check_outside_pipeline(path)
    if path.is_dir():
        if sha256:
            raise UserError("data.sha256 applies to archives, not to the folder "
                            f"{path}; set data.sha256 to null")
        copy_tree(path, target)
        return f"{path} -> {count_files(target)} files"
    if sha256:
        check_sha256(path, sha256, delete=False)
    extract_archive(path, target, max_bytes)
    return f"{path} -> {count_files(target)} files"


def check_outside_pipeline(path: Path) -> None:
    """Refuse a source inside the pipeline's own folders (data/, models/, ...) or holding one (the project)."""
    root = Path(os.path.realpath(repo_root()))
    real = Path(os.path.realpath(path))
    for folder in PIPELINE_FOLDERS:
        own = root / folder
        if real.is_relative_to(own) or own.is_relative_to(real):
            where = "is inside" if real.is_relative_to(own) else "holds"
            raise UserError(f"data.source {str(path)!r} {where} the pipeline's own folder {folder}/, whose files are "
                            "outputs, not data; point data.source at the dataset outside data/, models/, metrics/, "
                            "plots/ and explanations/")


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
        urllib.request.urlopen(request, timeout=web.NETWORK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the server answered: the network is there
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot reach {url} to download {what} ({reason}). {LOCAL_SOURCE_HINT}") from None


# ------------------------------------------------------------- local copies
def copy_tree(src: Path, dst: Path) -> None:
    """Mirror the folder `src` into the existing folder `dst`, copying each file (`fsio.copy_file`).

    Never a hard link: DVC caches `data/raw` by hard-linking its files into
    `.dvc/cache` (`cache.type` in .dvc/config) and makes them read-only, which
    through a shared inode would turn the user's own files read-only and let an
    edit of one corrupt the cache.

    Everything is checked before anything is copied. A link to a file inside
    `src` is followed (its file is copied under the link's name); a link that
    leads outside `src`, a dangling link, a link to a folder (a class folder
    linked from elsewhere, say) and anything that is neither file nor folder
    (a pipe, a device) are refused, all named in one message. So `dst` holds
    plain files and folders only, and nothing from outside `src`.
    """
    root = Path(os.path.realpath(src))
    plan: list[tuple[Path, Path]] = []  # (file to copy, its path under dst)
    problems: list[str] = []
    for folder, dirs, files in os.walk(root):  # does not descend into linked folders
        here = Path(folder)
        rel = here.relative_to(root)
        for name in dirs:
            if (here / name).is_symlink():
                problems.append(f"{shown_name((rel / name).as_posix())} -> {os.readlink(here / name)} (a link to "
                                "a folder; links to folders are not followed: put the folder itself there)")
        dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
        for name in files:
            path = here / name
            shown = shown_name((rel / name).as_posix())
            if why := name_problem((rel / name).as_posix(), dst):
                problems.append(f"{shown} ({why})")
            elif path.is_symlink():
                real = Path(os.path.realpath(path))
                if not real.exists():
                    problems.append(f"{shown} -> {os.readlink(path)} (a dangling link: its target does not exist)")
                elif not real.is_relative_to(root):
                    problems.append(f"{shown} -> {os.readlink(path)} (a link leading outside {src})")
                elif not real.is_file():
                    problems.append(f"{shown} -> {os.readlink(path)} (a link to something that is not a file)")
                else:
                    plan.append((real, rel / name))
            elif path.is_file():
                plan.append((path, rel / name))
            else:
                problems.append(f"{shown} (neither a file nor a folder: a pipe, socket or device)")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UserError(f"data.source folder {src} has entries that are not copied: {', '.join(problems[:5])}"
                        f"{more}; nothing was copied. Replace each link by the file or folder itself, rename each "
                        "file as its reason says, or remove it")
    for folder, dirs, _ in os.walk(root):
        rel = Path(folder).relative_to(root)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink()]
    for file, rel in plan:
        copy_file(file, dst / rel)


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


# ----------------------------------------------------------------- http(s)
def download_url(url: str, downloads: Path, sha256: str | None, max_bytes: int) -> Path:
    """Download `url` into `downloads`, resuming a partial file (`cxrlab.data.web`); return the archive path.

    A file whose sha256 does not match is deleted and reported; so is one
    larger than `max_bytes` (an archive is no larger than what it unpacks to).
    """
    downloads.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    final = downloads / web.short_name(hashlib.sha256(url.encode()).hexdigest()[:12], name)
    part = final.with_name(final.name + ".part")

    if final.exists():
        if sha256 and file_sha256(final) == sha256.lower():
            return final  # a verified earlier download
        final.unlink()
    web.download(url, part, max_bytes, name)
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
