"""Hostile HTTP servers on 127.0.0.1: a file that changes between two ranged requests, a chunked body cut
short, a garbage status line, a server trickling bytes, 503s before a 200, a file name too long for the disk."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from cxrlab.data import web
from cxrlab.errors import UserError
from stages import download
from tests import test_download
from tests.conftest import set_params
from tests.test_download import DATASET, make_zip, raw_files

server = test_download.server  # the HTTP server on 127.0.0.1 fixture
V2 = {"ds/health/h1.png": b"healthy, version 2", "ds/tb/tb1.png": b"sick, version 2"}


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Retries without waiting."""
    monkeypatch.setattr(web, "BACKOFF_S", 0.01)


def raw_server(script: Callable[[socket.socket, int], None]):
    """A server on 127.0.0.1 running `script(connection, n)` for its n-th connection (n from 0)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve():
        n = 0
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)  # the request
                try:
                    script(conn, n)
                except OSError:  # the client hung up
                    pass
            n += 1
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/ds.zip", stop


@pytest.fixture
def raw():
    stops = []

    def start(script):
        url, stop = raw_server(script)
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop.set()


def fails(project, source: str, pattern: str) -> str:
    set_params(project / "params.yaml", {"data.source": source})
    with pytest.raises(UserError, match=pattern) as caught:
        download.main([])
    assert "\n" not in str(caught.value)
    assert not (project / "data" / "raw").exists()
    return str(caught.value)


@pytest.mark.parametrize("honours_if_range", [True, False])
def test_a_file_changed_between_two_ranged_requests_is_downloaded_again_whole(in_project, tmp_path, server,
                                                                             honours_if_range):
    url, handler = server
    v1 = make_zip(tmp_path / "v1.zip", {**DATASET, "ds/tb/big.png": bytes(range(256)) * 200}).read_bytes()
    v2 = make_zip(tmp_path / "v2.zip", {**V2, "ds/tb/big.png": bytes(range(255, -1, -1)) * 200}).read_bytes()
    half = len(v1) // 2
    handler.files, handler.then_files, handler.cut_first_at = {"/ds.zip": v1}, {"/ds.zip": v2}, half
    handler.honour_if_range = honours_if_range
    set_params(in_project / "params.yaml", {"data.source": f"{url}/ds.zip"})
    download.main([])
    assert raw_files(in_project) == {**V2, "ds/tb/big.png": bytes(range(255, -1, -1)) * 200}  # v2 only, unspliced
    # a server honouring If-Range sends the new file at once; one ignoring it sends the rest of v2 with
    # the new ETag, which is refused, and the download starts over from byte 0
    assert handler.ranges == [None, f"bytes={half}-"] + ([] if honours_if_range else [None])


def test_a_part_without_validators_is_not_resumed(in_project, tmp_path, server):
    url, handler = server
    archive = make_zip(tmp_path / "ds.zip", {**DATASET, "ds/tb/big.png": bytes(range(256)) * 200}).read_bytes()
    handler.files, handler.cut_first_at, handler.etag = {"/ds.zip": archive}, len(archive) // 2, None
    set_params(in_project / "params.yaml", {"data.source": f"{url}/ds.zip"})
    download.main([])
    assert handler.ranges == [None, None]  # nothing could tell a changed file: started over
    assert raw_files(in_project)["ds/tb/big.png"] == bytes(range(256)) * 200


def test_a_truncated_chunked_body_is_one_line(in_project, raw):
    def chunked_cut_short(conn, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n" + b"x" * 50)

    fails(in_project, raw(chunked_cut_short),
          r"download of http://127.0.0.1:\d+/ds.zip failed 5 times \(broken off after 50 bytes: IncompleteRead.*\); "
          "run the stage again to resume")


def test_a_garbage_status_line_is_one_line(in_project, raw):
    fails(in_project, raw(lambda conn, n: conn.sendall(b"garbage\r\n\r\n")),
          r"the server of http://127.0.0.1:\d+/ds.zip sent a broken answer \(BadStatusLine: garbage.*\); check the "
          "URL, or run the stage again to resume")


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_trickling_server_is_stopped_in_bounded_time(in_project, raw, where, monkeypatch):
    monkeypatch.setattr(web, "STALL_WINDOW_S", 0.4)  # 60 s and 64 kB in real use
    monkeypatch.setattr(web, "STALL_MIN_BYTES", 200)

    def trickle(conn, n):
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        if where == "body":
            conn.sendall(head)
        for byte in (head if where == "headers" else b"") + b"x" * 1000:  # one byte every 0.1 s: 100+ s in all
            conn.sendall(bytes([byte]))
            time.sleep(0.1)

    started = time.monotonic()
    fails(in_project, raw(trickle), r"download of .*ds.zip stalled: fewer than 200 bytes in 0.4 s; the part is kept")
    assert time.monotonic() - started < 5  # the server would trickle for 100 s


def test_503s_then_200_is_retried_with_backoff(in_project, tmp_path, raw, capsys):
    body = make_zip(tmp_path / "ds.zip", DATASET).read_bytes()

    def flaky(conn, n):
        if n < 2:
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    set_params(in_project / "params.yaml", {"data.source": raw(flaky)})
    download.main([])
    assert raw_files(in_project) == DATASET
    assert capsys.readouterr().err.count("HTTP 503 Service Unavailable; retrying in 0 s") == 2


def test_a_connection_reset_is_retried(in_project, tmp_path, raw, capsys):
    body = make_zip(tmp_path / "ds.zip", DATASET).read_bytes()

    def resets_first(conn, n):
        if n == 0:  # close with an RST instead of an answer
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    set_params(in_project / "params.yaml", {"data.source": raw(resets_first)})
    download.main([])
    assert raw_files(in_project) == DATASET
    assert "download: connection broken: " in capsys.readouterr().err


def test_a_server_failing_for_good_is_given_up_after_the_retries(in_project, raw, monkeypatch):
    monkeypatch.setattr(web, "RETRIES", 2)
    seen = []

    def down(conn, n):
        seen.append(n)
        conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

    fails(in_project, raw(down), r"failed 3 times \(HTTP 502 Bad Gateway\); run the stage again to resume")
    assert seen == [0, 1, 2]


def test_a_url_file_name_too_long_for_the_disk_is_shortened(in_project, tmp_path, server):
    url, handler = server
    name = "/" + "a" * 300 + ".zip"
    handler.files[name] = make_zip(tmp_path / "ds.zip", DATASET).read_bytes()
    set_params(in_project / "params.yaml", {"data.source": url + name})
    download.main([])
    assert raw_files(in_project) == DATASET


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/a b.zip", "http://127.0.0.1:port/ds.zip"])
def test_an_invalid_url_is_one_line(in_project, url):
    fails(in_project, url, r"data.source 'http://127.0.0.1:.*' is not a valid URL \(InvalidURL: .*\); fix data.source")
