"""Hostile archives and source folders: nothing escapes, nothing fills the disk (images, checkpoints
and output folders: test_hostile_files.py). Every case is built here; each asserts the message, that
nothing was written outside the destination and that no partial output remains."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from cxrlab.data import archives
from cxrlab.data.synthetic import make_dataset
from cxrlab.errors import UserError
from stages import download
from tests import test_download
from tests.conftest import set_params, stage
from tests.test_cli_errors import assert_user_error

server = test_download.server  # the HTTP server on 127.0.0.1 fixture

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # content does not matter to the archive checks
LIMITS = {"max_pixels": 50_000_000, "min_side": 32}  # params.yaml's


# ------------------------------------------------------------------ helpers
def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under `root`: (kind, size, mtime) of each file and link, the kind of each folder,
    by path; the bytecode caches a subprocess writes are left out."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in dirs + files:
            path = Path(folder) / name
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            found[path.relative_to(root).as_posix()] = (kind,) if kind == stat.S_IFDIR else (
                kind, st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture
def world(in_project, tmp_path):
    """The project copy (current folder) inside `tmp_path`, a sentinel file beside it, and the state of
    everything under `tmp_path` before the test; `world.unchanged()` says nothing changed."""
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("untouched")
    readme = in_project / "README.md"
    readme.write_text("the project's readme")
    (in_project / "data" / ".downloads").mkdir(parents=True)  # made by any download: not a change

    class World:
        project, root = in_project, tmp_path

        def __init__(self):
            self.before = None

        def freeze(self):
            self.before = snapshot(tmp_path)

        def unchanged(self):
            after = snapshot(tmp_path)
            assert after == self.before, {k: after.get(k) for k in set(after) ^ set(self.before)}
            assert sentinel.read_text() == "untouched" and readme.read_text() == "the project's readme"
            assert not list((in_project / "data").glob("raw*"))  # neither data/raw nor a temporary

    return World()


def tar_with(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    """A tar of `entries`: a TarInfo as is (links, folders), or (name, data) for a regular file."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tf.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tf.addfile(info, io.BytesIO(entry[1]))
    return path


def link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


def folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def zip_with(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None,
             compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            zf.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


CHAIN_STEPS = "abcdefghijklmnop"  # as in the published proof of concept


def cve_2025_4517_chain(climb: int) -> list:
    """The CVE-2025-4517 proof of concept, aimed `climb` folders above the extraction folder.

    Nested folders with 247-character names, each with a one-letter link to it, so that
    `a/b/.../p/lll...` resolves through a path longer than PATH_MAX, where path resolution (and
    with it tarfile's "data" filter before the 2025 fixes) gives up and reads the rest as text.
    That long link points back up to the extraction folder; `escape` goes through it and
    `climb` folders further up, while as text it stays inside; a README.md is written through it.
    """
    comp = "d" * 247
    entries, path = [], ""
    for step in CHAIN_STEPS:
        entries.append(folder(os.path.join(path, comp)))
        entries.append(link(os.path.join(path, step), comp))
        path = os.path.join(path, comp)
    long_link = os.path.join(*CHAIN_STEPS, "l" * 254)
    entries.append(link(long_link, "../" * len(CHAIN_STEPS)))
    entries.append(link("escape", long_link + "/" + "../" * climb))
    entries.append(("escape/README.md", b"pwned"))
    return entries


def refused(world, pattern: str) -> str:
    """Run the download stage in-process: it must raise one line matching `pattern` and change nothing."""
    world.freeze()
    with pytest.raises(UserError) as err:
        download.main([])
    message = str(err.value)
    assert "\n" not in message, message
    assert re.search(pattern, message), message
    world.unchanged()
    return message


def use_source(world, source, **changes) -> None:
    set_params(world.project / "params.yaml", {"data.source": str(source), **changes})


# ----------------------------------------------------------------- archives
def test_symlink_chain_past_path_max_is_refused_by_the_real_stage(project, tmp_path):
    """The CVE-2025-4517 archive that overwrote README.md, through `python -m stages.download`."""
    archive = tar_with(tmp_path / "chain.tar", cve_2025_4517_chain(climb=2))  # from data/raw.tmp-*: the project
    demo = tmp_path / "demo" / "data" / "raw"  # first, what Python's own filter does with it
    demo.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(demo, filter="data")
    except tarfile.FilterError:
        pass  # a Python with the 2025 fixes
    else:
        assert (tmp_path / "demo" / "README.md").read_bytes() == b"pwned"  # 3.11.7: it escapes
    shutil.rmtree(tmp_path / "demo")

    readme = project / "README.md"
    readme.write_text("the project's readme")
    (tmp_path / "sentinel.txt").write_text("untouched")
    (project / "data").mkdir()
    set_params(project / "params.yaml", {"data.source": str(archive)})
    # the long link's real place, comp/comp/.../lll under data/raw.tmp-*, is past PATH_MAX
    longest = len(str(project / "data" / "raw.tmp-12345678")) + len(CHAIN_STEPS) * 248 + 255
    assert longest > os.pathconf("/", "PC_PATH_MAX")
    before = snapshot(tmp_path)
    result = stage("download", cwd=project)
    links = len(CHAIN_STEPS) + 2  # the one-letter links, the long one, escape
    assert_user_error(result, f"error: download: archive chain.tar has {links} unsafe entries: 'a' (symbolic link to "
                              "'ddd", f"and {links - 5} more; nothing was extracted")
    assert snapshot(tmp_path) == before
    assert readme.read_text() == "the project's readme" and (tmp_path / "sentinel.txt").read_text() == "untouched"
    assert list((project / "data").iterdir()) == []


@pytest.mark.parametrize("entries, named", [
    # the shorter chain Python's filter stopped with a traceback
    ([folder("ds/Healthy"), link("ds/b", "Healthy/.."), link("ds/c", "b/.."), ("ds/c/x", b"pwned")],
     r"'ds/b' \(symbolic link to 'Healthy/\.\.'\), 'ds/c' \(symbolic link to 'b/\.\.'\)"),
    # a link that stays inside the archive: still no place in a dataset
    ([("ds/tb/a.png", PNG_BYTES), link("ds/tb/b.png", "a.png")], r"'ds/tb/b.png' \(symbolic link to 'a.png'\)"),
    # hard links, to a file outside and to one inside
    ([("ds/tb/a.png", PNG_BYTES), link("ds/tb/p.png", "/etc/passwd", hard=True)],
     r"'ds/tb/p.png' \(hard link to '/etc/passwd'\)"),
    ([("ds/tb/a.png", PNG_BYTES), link("ds/tb/b.png", "ds/tb/a.png", hard=True)],
     r"'ds/tb/b.png' \(hard link to 'ds/tb/a.png'\)"),
    # names that leave the folder
    ([("/tmp/evil.png", PNG_BYTES)], r"'/tmp/evil.png' \(absolute path\)"),
    ([("ds/../../evil.png", PNG_BYTES)], r"'ds/../../evil.png' \('\.\.' in the path\)"),
    ([("C:\\evil.png", PNG_BYTES)], r"\(absolute path\)"),
    ([("ds\\..\\..\\evil.png", PNG_BYTES)], r"\('\.\.' in the path\)"),
])
def test_tar_links_and_escaping_names_are_refused_before_extraction(world, entries, named):
    use_source(world, tar_with(world.root / "evil.tar.gz", entries, "w:gz"))
    message = refused(world, named)
    assert "nothing was extracted" in message
    assert not Path("/tmp/evil.png").exists() or Path("/tmp/evil.png").read_bytes() != PNG_BYTES


def test_tar_devices_and_fifos_are_refused(world):
    fifo = tarfile.TarInfo("ds/tb/pipe.png")
    fifo.type = tarfile.FIFOTYPE
    dev = tarfile.TarInfo("ds/tb/dev.png")
    dev.type = tarfile.CHRTYPE
    use_source(world, tar_with(world.root / "dev.tar", [("ds/tb/a.png", PNG_BYTES), fifo, dev]))
    refused(world, r"2 unsafe entries: 'ds/tb/pipe.png' \(device or special file\), 'ds/tb/dev.png'")


@pytest.mark.parametrize("files, symlinks, named", [
    ({"ok/a.png": b"a"}, {"ok/b.png": "/etc/passwd"}, r"'ok/b.png' \(symbolic link\)"),
    ({"ok/a.png": b"a"}, {"ok/c.png": "a.png"}, r"'ok/c.png' \(symbolic link\)"),
    ({"ok/a.png": b"a", "/abs.png": b"x"}, None, r"'/abs.png' \(absolute path\)"),
    ({"ok/a.png": b"a", "C:/abs.png": b"x"}, None, r"'C:/abs.png' \(absolute path\)"),
    ({"ok/a.png": b"a", "ok/../../up.png": b"x"}, None, r"'ok/../../up.png' \('\.\.' in the path\)"),
    ({"ok/a.png": b"a", "ok/a.png/b.png": b"x"}, None, r"'ok/a.png/b.png' \(inside 'ok/a.png', which is a file\)"),
])
def test_zip_links_and_escaping_names_are_refused_before_extraction(world, files, symlinks, named):
    use_source(world, zip_with(world.root / "evil.zip", files, symlinks))
    refused(world, named)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_high_ratio_member_is_refused_and_nothing_stays_on_disk(world, kind):
    """8 MB of zeros packs to about 8 KB: no image inflates 1000 times."""
    zeros = bytes(8 << 20)
    if kind == "zip":
        archive = zip_with(world.root / "bomb.zip", {"ds/tb/a.png": PNG_BYTES, "ds/tb/zeros.png": zeros},
                           compression=zipfile.ZIP_DEFLATED)
        expected = r"'ds/tb/zeros.png' \(8388608 bytes compressed into \d+, over 100:1: not an image but a zip bomb\)"
    else:
        archive = tar_with(world.root / "bomb.tar.gz", [("ds/tb/a.png", PNG_BYTES), ("ds/tb/zeros.png", zeros)], "w:gz")
        expected = r"entry 'ds/tb/zeros.png' inflates more than 100:1 .*extraction stopped and nothing was kept"
    assert archive.stat().st_size < 100_000
    use_source(world, archive)
    refused(world, expected)


def test_overlapping_zip_members_are_refused(world):
    """Fifield's zip bomb: central-directory entries sharing one compressed stream."""
    archive = zip_with(world.root / "overlap.zip", {"ds/a.png": PNG_BYTES, "ds/b.png": PNG_BYTES})
    data = bytearray(archive.read_bytes())
    cd = data.rindex(b"PK\x01\x02")  # the second member's central-directory entry: point it at the first
    data[cd + 42:cd + 46] = struct.pack("<I", 0)
    archive.write_bytes(bytes(data))
    use_source(world, archive)
    refused(world, r"'ds/a.png' \(its data overlaps 'ds/b.png': a zip bomb\)")


def test_an_archive_over_the_total_limit_is_refused_before_extraction(world):
    archive = zip_with(world.root / "big.zip", {f"ds/tb/{i}.png": os.urandom(4000) for i in range(5)})
    use_source(world, archive, **{"data.max_unpacked_gb": 1e-5})  # 10 kB
    refused(world, r"archive big.zip unpacks to 2e-05 GB, more than data.max_unpacked_gb \(1e-05 GB\); "
                   r"nothing was extracted. Raise data.max_unpacked_gb")


@pytest.mark.parametrize("lie, expected", [
    (False, r"lies.zip unpacks to more than data.max_unpacked_gb \(1e-05 GB\); "
            r"extraction stopped and nothing was kept"),
    (True, r"entry 'ds/tb/1.png' unpacks to more than the 0 bytes it declares; extraction stopped"),
])
def test_bytes_written_are_counted_beside_the_declared_sizes(world, monkeypatch, lie, expected):
    """Should the up-front plan be fooled (here: skipped), the count while writing still stops the
    extraction at the total limit, or at a member writing more than it declared."""
    archive = zip_with(world.root / "lies.zip", {f"ds/tb/{i}.png": os.urandom(4000) for i in range(5)})
    monkeypatch.setattr(archives, "_plan", lambda archive, entries, target, max_bytes: [
        archives._Member(archives._member_path(name), False, 0 if lie and i else size, compressed, ref)
        for i, (name, why, ref, size, compressed) in enumerate(entries)])
    use_source(world, archive, **{"data.max_unpacked_gb": 1e-5})  # 10 kB of the 20 kB
    refused(world, expected)


def test_a_refused_download_is_deleted(world, server):
    url, handler = server
    evil = zip_with(world.root / "evil.zip", {"ok/a.png": b"a"}, {"ok/b.png": "/etc/passwd"})
    handler.files["/evil.zip"] = evil.read_bytes()
    (world.root / "evil.zip").unlink()
    use_source(world, f"{url}/evil.zip", **{"data.sha256": hashlib.sha256(handler.files["/evil.zip"]).hexdigest()})
    refused(world, r"'ok/b.png' \(symbolic link\).*The download data/.downloads/\w+-evil.zip was deleted")
    assert list((world.project / "data" / ".downloads").iterdir()) == []


def test_a_download_larger_than_the_limit_is_stopped_and_deleted(world, server):
    url, handler = server
    handler.files["/big.zip"] = os.urandom(20_000)
    use_source(world, f"{url}/big.zip", **{"data.max_unpacked_gb": 1e-5})
    refused(world, r"big.zip is 2e-05 GB, more than data.max_unpacked_gb \(1e-05 GB\); nothing was kept")
    assert list((world.project / "data" / ".downloads").iterdir()) == []


# ------------------------------------------------------------ local folders
def local_source(root: Path) -> Path:
    src = root / "src"
    make_dataset(src, n_per_class=3, size=32, subdir="")
    return src


def test_a_link_to_a_file_inside_the_folder_is_followed_as_a_plain_file(in_project, tmp_path):
    src = local_source(tmp_path)
    first = sorted((src / "tb").iterdir())[0]
    (src / "tb" / "tb0999.png").symlink_to(first.name)
    set_params(in_project / "params.yaml", {"data.source": str(src)})
    download.main([])
    copied = in_project / "data" / "raw" / "tb" / "tb0999.png"
    assert not copied.is_symlink() and copied.read_bytes() == first.read_bytes()


@pytest.mark.parametrize("make, named", [
    (lambda src, out: (src / "tb" / "x.png").symlink_to(out / "secret.txt"),
     r"tb/x.png -> .*/outside/secret.txt \(a link leading outside .*/src\)"),
    (lambda src, out: (src / "tb" / "gone.png").symlink_to("nothing-here.png"),
     r"tb/gone.png -> nothing-here.png \(a dangling link: its target does not exist\)"),
    (lambda src, out: (shutil.rmtree(src / "tb"), shutil.copytree(src / "health", out / "tb"),
                       (src / "tb").symlink_to(out / "tb")),
     r"tb -> .*/outside/tb \(a link to a folder; links to folders are not followed: put the folder itself there\)"),
    (lambda src, out: os.mkfifo(src / "tb" / "pipe.png"),
     r"tb/pipe.png \(neither a file nor a folder: a pipe, socket or device\)"),
])
def test_links_out_dangling_links_and_linked_folders_are_named(world, make, named):
    src = local_source(world.root)
    outside = world.root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("root:x:0:0")
    make(src, outside)
    use_source(world, src)
    refused(world, f"data.source folder .*/src has entries that are not copied: {named}; nothing was copied")


def test_a_source_beginning_with_a_tilde_is_expanded(in_project, tmp_path, monkeypatch):
    local_source(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    set_params(in_project / "params.yaml", {"data.source": "~/src"})
    download.main([])
    assert len(list((in_project / "data" / "raw" / "tb").iterdir())) == 3


def test_a_tilde_that_cannot_be_expanded_asks_for_a_full_path(world):
    use_source(world, "~no-such-user-here/datasets/tbx11k")
    refused(world, r"data.source '~no-such-user-here/datasets/tbx11k': cannot expand '~no-such-user-here' .*"
                   r"write the full path")
