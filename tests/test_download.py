"""The download stage against local folders, archives and an HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from cxrlab.data import fetch, web
from cxrlab.errors import UserError
from stages import download
from tests.conftest import set_params


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


DATASET = {"ds/health/h1.png": b"healthy", "ds/tb/tb1.png": b"sick"}


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `files` with an ETag; honours Range (and If-Range unless told not to); can cut the first
    response short and then, once, swap `files` for `then_files` (a new version, with ETag `"v2"`)."""

    files: dict[str, bytes] = {}
    cut_first_at: int | None = None
    ranges: list[str | None] = []
    etag: str | None = '"v1"'
    honour_if_range = True
    then_files: dict[str, bytes] | None = None

    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def do_GET(self):
        cls = type(self)
        data = cls.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        cls.ranges.append(rng)
        if rng and cls.honour_if_range and self.headers.get("If-Range") not in (None, cls.etag):
            rng = None  # the file changed: the whole new file
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if cls.etag:
            self.send_header("ETag", cls.etag)
        self.end_headers()
        if cls.cut_first_at is not None:
            self.wfile.write(body[: cls.cut_first_at])
            cls.cut_first_at = None
            self.wfile.flush()
            self.close_connection = True
            if cls.then_files is not None:
                cls.files, cls.then_files, cls.etag = cls.then_files, None, '"v2"'
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.files, RangeHandler.cut_first_at, RangeHandler.ranges = {}, None, []
    RangeHandler.etag, RangeHandler.honour_if_range, RangeHandler.then_files = '"v1"', True, None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", RangeHandler
    httpd.shutdown()


def raw_files(project: Path) -> dict[str, bytes]:
    raw = project / "data" / "raw"
    return {p.relative_to(raw).as_posix(): p.read_bytes() for p in raw.rglob("*") if p.is_file()}


def leftovers(project: Path) -> list[str]:
    """Anything a failed download left in data/ (temporaries, partial or rejected archives)."""
    data = project / "data"
    if not data.exists():
        return []
    return sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())


def test_local_folder(in_project, tmp_path):
    src = tmp_path / "src"
    for name, data in DATASET.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    set_params(in_project / "params.yaml", {"data.source": str(src)})
    download.main([])
    assert raw_files(in_project) == DATASET


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_local_archive(in_project, tmp_path, kind):
    archive = make_zip(tmp_path / "ds.zip", DATASET) if kind == "zip" else make_tar(tmp_path / "ds.tar.gz", DATASET)
    set_params(in_project / "params.yaml", {"data.source": str(archive),
                                            "data.sha256": hashlib.sha256(archive.read_bytes()).hexdigest()})
    download.main([])
    assert raw_files(in_project) == DATASET


def test_http_archive_with_sha256(in_project, tmp_path, server):
    url, handler = server
    archive = make_zip(tmp_path / "ds.zip", DATASET).read_bytes()
    handler.files["/files/ds.zip"] = archive
    set_params(in_project / "params.yaml", {"data.source": f"{url}/files/ds.zip",
                                            "data.sha256": hashlib.sha256(archive).hexdigest()})
    download.main([])
    assert raw_files(in_project) == DATASET


def test_http_wrong_sha256_is_rejected_and_nothing_is_left(in_project, tmp_path, server):
    url, handler = server
    handler.files["/ds.zip"] = make_zip(tmp_path / "ds.zip", DATASET).read_bytes()
    set_params(in_project / "params.yaml", {"data.source": f"{url}/ds.zip", "data.sha256": "0" * 64})
    with pytest.raises(UserError,
                       match=r"sha256 of .*ds.zip is [0-9a-f]{64}, but data.sha256 is 0{64}; the file was deleted"):
        download.main([])
    assert not (in_project / "data" / "raw").exists()
    assert leftovers(in_project) == []


def test_http_resumes_a_broken_download(in_project, tmp_path, server, monkeypatch):
    url, handler = server
    archive = make_zip(tmp_path / "ds.zip", {**DATASET, "ds/tb/big.png": bytes(range(256)) * 400}).read_bytes()
    handler.files["/ds.zip"] = archive
    handler.cut_first_at = len(archive) // 2
    set_params(in_project / "params.yaml", {"data.source": f"{url}/ds.zip"})
    monkeypatch.setattr(web, "RETRIES", 0)  # no retry within the run: the next run resumes
    with pytest.raises(UserError, match="run the stage again to resume"):
        download.main([])
    assert not (in_project / "data" / "raw").exists()
    download.main([])
    assert handler.ranges == [None, f"bytes={len(archive) // 2}-"]
    assert raw_files(in_project)["ds/tb/big.png"] == bytes(range(256)) * 400
    assert leftovers(in_project) == sorted(f"raw/{n}" for n in [*DATASET, "ds/tb/big.png"])


def test_http_error_names_the_url(in_project, server):
    url, _ = server
    set_params(in_project / "params.yaml", {"data.source": f"{url}/missing.zip"})
    with pytest.raises(UserError, match=r"downloading http://127.0.0.1:\d+/missing.zip failed: HTTP 404"):
        download.main([])


@pytest.mark.parametrize("members, links, why", [
    ({"ds/../../evil.txt": b"x"}, None, r"'\.\.' in the path"),
    ({"/tmp/evil.txt": b"x"}, None, "absolute path"),
    ({"ds/a.png": b"x"}, {"ds/escape": "../../outside"}, "symbolic link to '../../outside'"),
])
def test_unsafe_archive_entries_are_refused(in_project, tmp_path, members, links, why):
    archive = make_tar(tmp_path / "evil.tar.gz", members, links)
    set_params(in_project / "params.yaml", {"data.source": str(archive)})
    with pytest.raises(UserError, match=f"an unsafe entry: .*{why}.*nothing was extracted"):
        download.main([])
    assert not (in_project / "data" / "raw").exists()
    assert leftovers(in_project) == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_zip_with_dotdot_is_refused(in_project, tmp_path):
    archive = make_zip(tmp_path / "evil.zip", {"ok/a.png": b"a", "../evil.txt": b"x"})
    set_params(in_project / "params.yaml", {"data.source": str(archive)})
    with pytest.raises(UserError, match=r"an unsafe entry: '../evil.txt'"):
        download.main([])
    assert not (in_project / "data" / "raw").exists()
    assert not (in_project / "data" / "evil.txt").exists()


def test_missing_local_source(in_project):
    set_params(in_project / "params.yaml", {"data.source": "/no/such/folder"})
    with pytest.raises(UserError, match=r"data.source '/no/such/folder' does not exist"):
        download.main([])
    assert leftovers(in_project) == []


def test_kaggle_without_network_fails_fast_with_the_way_out(in_project, monkeypatch):
    monkeypatch.setattr(fetch, "KAGGLE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        download.main([])
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert "cannot reach http://127.0.0.1:9 to download kaggle:usmanshams/tbx-11" in message
    assert "dvc exp run -S data.source=/path/to/folder-or-archive" in message
    assert not (in_project / "data" / "raw").exists()


def test_kaggle_source_goes_through_kagglehub(in_project, tmp_path, monkeypatch):
    cache = tmp_path / "kagglehub" / "datasets" / "usmanshams" / "tbx-11" / "versions" / "1"
    for name, data in DATASET.items():
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(data)
    asked = []
    import kagglehub

    monkeypatch.setattr(fetch, "require_network", lambda url, what: None)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle: asked.append(handle) or str(cache))
    download.main([])
    assert asked == ["usmanshams/tbx-11"]
    assert raw_files(in_project) == DATASET


def test_bad_kaggle_handle(in_project):
    set_params(in_project / "params.yaml", {"data.source": "kaggle:just-a-name"})
    with pytest.raises(UserError, match="is not a Kaggle dataset handle"):
        download.main([])
