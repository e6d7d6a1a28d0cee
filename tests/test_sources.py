"""Local sources: copied, never hard-linked (the user's files keep their mode and inode through a real
`dvc repro download`); sources that are not a folder or a regular file, or are the pipeline's own
folders, refused at once; names that are not UTF-8 or too long, and archives of too many entries, refused
naming the entry."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from cxrlab.data import archives
from cxrlab.errors import UserError
from stages import download
from tests.conftest import dvc, git_repo, set_params
from tests.test_download import DATASET, make_zip, raw_files


def source_folder(root: Path, files: dict[str, bytes] = DATASET) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def refused(project: Path, source: str, pattern: str, raw_before: bool = False) -> str:
    set_params(project / "params.yaml", {"data.source": source})
    with pytest.raises(UserError, match=pattern) as caught:
        download.main([])
    assert "\n" not in str(caught.value)
    assert [p.name for p in (project / "data").glob("raw*")] == (["raw"] if raw_before else [])  # no temporary
    return str(caught.value)


def test_a_local_source_keeps_its_files_mode_and_inode_through_dvc_repro(project, tmp_path):
    src = source_folder(tmp_path / "src")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    (files[0]).chmod(0o600)  # a private file stays private, the others writable
    before = {p: os.stat(p) for p in files}
    set_params(project / "params.yaml", {"data.source": str(src)})
    git_repo(project)
    dvc("repro", "download", cwd=project)  # with the project's cache.type: hardlink
    assert raw_files(project) == DATASET
    cached = {(st.st_dev, st.st_ino) for st in map(os.stat, (project / ".dvc" / "cache").rglob("*")) if
              stat.S_ISREG(st.st_mode)}
    assert len(cached) >= len(DATASET)  # DVC cached the files (the cache is where this test looks)
    for path, old in before.items():
        now = os.stat(path)
        assert (now.st_ino, stat.S_IMODE(now.st_mode), now.st_nlink) == (old.st_ino, stat.S_IMODE(old.st_mode), 1)
        assert (now.st_dev, now.st_ino) not in cached  # editing the user's file cannot touch the cache
    files[1].write_bytes(b"edited by the user")  # writable as before; the cache and data/raw are not touched
    assert raw_files(project) == DATASET
    for entry in (project / ".dvc" / "cache" / "files" / "md5").rglob("*"):
        if entry.is_file() and not entry.name.endswith(".dir"):  # every cache file still matches its hash
            assert hashlib.md5(entry.read_bytes()).hexdigest() == entry.parent.name + entry.name


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_source_that_is_neither_folder_nor_file_is_refused_at_once(in_project, tmp_path, kind):
    source = "/dev/zero" if kind == "device" else str(tmp_path / "pipe")
    if kind == "fifo":
        os.mkfifo(source)
    started = time.monotonic()
    refused(in_project, source, r"data.source '.*' is neither a folder nor a regular file \(a device, pipe or "
                                r"socket\); point data.source at a folder or a .zip/.tar archive")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("source, where", [("data", "is inside the pipeline's own folder data/"),
                                           ("data/raw", "is inside the pipeline's own folder data/"),
                                           ("models", "is inside the pipeline's own folder models/"),
                                           (".", "holds the pipeline's own folder data/")])
def test_the_pipelines_own_folders_are_refused_as_a_source(in_project, source, where):
    source_folder(in_project / "data" / "raw")
    source_folder(in_project / "models")
    refused_dirs = refused(in_project, source, f"data.source '.*' {where}", raw_before=True)
    assert "point data.source at the dataset outside data/, models/" in refused_dirs
    # data/raw from before is untouched: the refusal came before anything was written
    assert raw_files(in_project) == DATASET


def test_a_tar_with_latin1_names_is_refused_naming_the_entry(in_project, tmp_path):
    archive = tmp_path / "latin1.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name, data in {**DATASET, "ds/health/café.png": b"x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    refused(in_project, str(archive), r"archive latin1.tar has an unsafe entry: 'ds/health/caf\\\\xe9.png' \(a name "
                                      r"that is not UTF-8: rename it \(e.g. convmv -f latin1 -t utf8\)\)")


def test_a_local_file_named_with_invalid_utf8_is_refused_naming_it(in_project, tmp_path):
    src = source_folder(tmp_path / "src")
    with open(os.path.join(os.fsencode(src / "ds" / "tb"), b"caf\xe9.png"), "wb") as f:
        f.write(b"x")
    refused(in_project, str(src), r"data.source folder .* has entries that are not copied: ds/tb/caf\\xe9.png \(a "
                                  r"name that is not UTF-8: rename it.*\); nothing was copied")


def test_a_zip_member_name_too_long_for_the_disk_is_one_line(in_project, tmp_path):
    archive = make_zip(tmp_path / "long.zip", {**DATASET, "ds/tb/" + "a" * 300 + ".png": b"x"})
    refused(in_project, str(archive), r"archive long.zip has an unsafe entry: 'ds/tb/a.*png' \(a name of 304 bytes, "
                                      r"over the file system's 255: shorten it\)")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_archive_of_too_many_entries_is_refused_before_extraction(in_project, tmp_path, monkeypatch, kind):
    monkeypatch.setattr(archives, "MAX_ENTRIES", 20)  # the real 250,000 in small: 21 empty entries
    names = [f"ds/health/{i}.png" for i in range(21)]
    archive = tmp_path / f"many.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name in names:
                zf.writestr(name, b"")
    else:
        with tarfile.open(archive, "w") as tf:
            for name in names:
                tf.addfile(tarfile.TarInfo(name))
    held = "21" if kind == "zip" else "more than 20"
    refused(in_project, str(archive), f"archive many.{kind} holds {held} entries, over the 20 a dataset archive "
                                      "may hold .*; nothing was extracted. Unpack it yourself and point data.source "
                                      "at the folder")
