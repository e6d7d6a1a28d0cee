"""HTTP(S) downloads that resume without splicing versions, retry what is worth retrying and never hang.

A download is written to `<name>.part`, beside `<name>.part.json` holding the
validators the server sent with it (ETag, Last-Modified) and its total size.
A later attempt asks for the rest with `Range` and `If-Range`: a server that
still has the same file answers 206 with the rest; one whose file changed
answers 200 with the whole new file, which replaces the part. Servers that
ignore If-Range are caught too: a 206 whose validators or Content-Range do
not match the part's starts the download over from byte 0, and so does a
part whose server sent no validator (nothing could tell a changed file).

5xx answers, connection resets and bodies cut short are retried RETRIES
times with a doubling wait (a 503's Retry-After is honoured up to
MAX_WAIT_S). A watchdog thread ends a download that brings fewer than
STALL_MIN_BYTES in STALL_WINDOW_S seconds (a server trickling a byte every
few seconds would otherwise never time out: each read gets its byte well
within NETWORK_TIMEOUT_S), headers included. Every failure is one line that
says to run the stage again; the part is kept to resume.

urllib rather than requests or httpx: neither is a dependency, and both would
still need the same validator and stall logic on top.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from cxrlab.errors import UserError

CHUNK = 1 << 20
NETWORK_TIMEOUT_S = 15  # one socket operation: connecting, one read
STALL_WINDOW_S = 60.0  # a download bringing fewer than STALL_MIN_BYTES in this many seconds
STALL_MIN_BYTES = 64 * 1024  # (headers included) is stopped as stalled: about 1 kB/s
RETRIES = 4  # further attempts after a 5xx, a connection reset or a body cut short
BACKOFF_S = 2.0  # the first wait before a retry, doubled each time (2, 4, 8, 16 s)
MAX_WAIT_S = 60.0  # the longest wait, a server's Retry-After included
RETRY_STATUSES = {500, 502, 503, 504}
RERUN = "run the stage again to resume"
LOCAL_SOURCE_HINT = (
    "Without internet, get the dataset another way and point data.source at it: "
    "dvc exp run -S data.source=/path/to/folder-or-archive (or edit params.yaml)"
)


class _Retry(Exception):
    """A failure worth another attempt; `wait` is the server's Retry-After, if any."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class _Watchdog:
    """Shuts the connection's socket when a window of STALL_WINDOW_S brings fewer than STALL_MIN_BYTES.

    The blocked read in the main thread then returns or fails at once; `fired` tells why.
    """

    def __init__(self):
        self.sock: socket.socket | None = None
        self.received = 0
        self.fired = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        dog = self

        def watched(base):
            class Watched(base):
                def connect(self):
                    super().connect()
                    dog.sock = self.sock  # a redirect's new connection replaces it

            return Watched

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(watched(http.client.HTTPConnection), req)

        class HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

        self.opener = urllib.request.build_opener(HTTP, HTTPS)

    def __enter__(self) -> "_Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        start, seen = time.monotonic(), 0
        while not self._done.wait(min(1.0, STALL_WINDOW_S / 5)):
            now = time.monotonic()
            if now - start < STALL_WINDOW_S:
                continue
            if self.received - seen < STALL_MIN_BYTES:
                self.fired = True
                if self.sock is not None:
                    try:  # the plain socket call, also under TLS: wakes the blocked read with an EOF
                        socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            start, seen = now, self.received


def download(url: str, part: Path, max_bytes: int, name: str) -> None:
    """Complete `part` from `url` (resuming it where it is safe), retrying transient failures."""
    for attempt in range(RETRIES + 1):
        try:
            _attempt(url, part, max_bytes, name)
            _meta(part).unlink(missing_ok=True)
            return
        except _Retry as err:
            if attempt == RETRIES:
                tries = f" {RETRIES + 1} times" if RETRIES else ""
                raise UserError(f"download of {url} failed{tries} ({err}); {RERUN}") from None
            wait = min(MAX_WAIT_S, err.wait if err.wait is not None else BACKOFF_S * 2 ** attempt)
            print(f"download: {err}; retrying in {wait:.3g} s ({attempt + 1} of {RETRIES})", file=sys.stderr)
            time.sleep(wait)


def _meta(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict:
    try:
        meta = json.loads(_meta(part).read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta(part).unlink(missing_ok=True)


def _validator(meta: dict) -> str | None:
    """What If-Range may carry: a strong ETag, else the Last-Modified date (RFC 9110, 13.1.5)."""
    etag = meta.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return meta.get("last_modified")


def _same_file(meta: dict, headers, have: int) -> bool:
    """Whether a 206 answer continues the part: matching validators and a range starting at `have`."""
    pairs = [(meta.get("etag"), headers.get("ETag")), (meta.get("last_modified"), headers.get("Last-Modified"))]
    known = [(a, b) for a, b in pairs if a and b]
    if not known or any(a != b for a, b in known):
        return False
    try:  # Content-Range: bytes <first>-<last>/<total or *>
        span, total = headers.get("Content-Range", "").split(" ", 1)[1].split("/")
        first = int(span.split("-")[0])
    except (IndexError, ValueError):
        return False
    return first == have and (total == "*" or meta.get("total") in (None, int(total)))


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers else None
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate(value) else None
    return max(0.0, when.timestamp() - time.time()) if when else None


def _describe(err: BaseException) -> str:
    """The error's kind and text on one line, short (a garbage status line may be long, or hold anything)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in f"{type(err).__name__}: {err}")
    return text[:200]


TRANSIENT = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.IncompleteRead)


def _attempt(url: str, part: Path, max_bytes: int, name: str) -> None:
    meta = _read_meta(part) if part.exists() else {}
    have = part.stat().st_size if part.exists() else 0
    if have and not _validator(meta):
        _discard(part)  # the server sent no validator: a resume could not tell a changed file
        have, meta = 0, {}
    request = urllib.request.Request(url)
    if have:
        request.add_header("Range", f"bytes={have}-")
        request.add_header("If-Range", _validator(meta))
    with _Watchdog() as dog:
        try:
            response = dog.opener.open(request, timeout=NETWORK_TIMEOUT_S)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code == 416 and have:  # nothing left to fetch, or a stale part: start over
                _discard(part)
                return _attempt(url, part, max_bytes, name)
            if err.code in RETRY_STATUSES:
                raise _Retry(f"HTTP {err.code} {err.reason}", _retry_after(err)) from None
            raise UserError(f"downloading {url} failed: HTTP {err.code} {err.reason}; check the URL") from None
        except (http.client.InvalidURL, ValueError) as err:  # a space or control character, a port not a number
            raise UserError(f"data.source {url!r} is not a valid URL ({_describe(err)}); fix data.source") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            if dog.fired:
                raise _stalled(url) from None
            if isinstance(reason, TRANSIENT):
                raise _Retry(f"connection broken: {_describe(reason)}") from None
            if isinstance(err, http.client.HTTPException):
                raise UserError(f"the server of {url} sent a broken answer ({_describe(err)}); check the URL, or "
                                f"{RERUN}") from None
            raise UserError(f"cannot download {url} ({reason}). {LOCAL_SOURCE_HINT}") from None
        with response:
            _receive(url, response, part, have, meta, max_bytes, name, dog)


def _stalled(url: str) -> UserError:
    return UserError(f"download of {url} stalled: fewer than {STALL_MIN_BYTES} bytes in {STALL_WINDOW_S:g} s; the "
                     f"part is kept: check the network and {RERUN}")


def _receive(url, response, part: Path, have: int, meta: dict, max_bytes: int, name: str, dog: _Watchdog) -> None:
    headers = response.headers
    resumed = have and response.status == 206
    if resumed and not _same_file(meta, headers, have):
        print(f"download: {url} changed on the server since the partial download; starting over", file=sys.stderr)
        _discard(part)
        response.close()
        raise _Retry("the file changed on the server", wait=0)
    start = have if resumed else 0
    length = headers.get("Content-Length")
    total = start + int(length) if length and length.isdigit() else None
    if total is not None and total > max_bytes:
        _discard(part)
        raise _too_large(url, f"{total / 1e9:.3g} GB", max_bytes)
    if not resumed:
        _meta(part).write_text(json.dumps({"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
                                           "total": total}))
    with open(part, "ab" if resumed else "wb") as out, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, desc=f"download {name}"
    ) as bar:
        while True:
            try:
                chunk = response.read1(CHUNK)
            except (OSError, http.client.HTTPException) as err:  # the network; a full disk is not caught here
                if dog.fired:
                    raise _stalled(url) from None
                if isinstance(err, TRANSIENT):
                    raise _Retry(f"broken off after {out.tell()} bytes: {_describe(err)}") from None
                raise UserError(f"download of {url} broke off after {out.tell()} bytes ({_describe(err)}); "
                                f"{RERUN}") from None
            if dog.fired:
                raise _stalled(url)
            if not chunk:
                break
            dog.received += len(chunk)
            if out.tell() + len(chunk) > max_bytes:
                out.close()
                _discard(part)
                raise _too_large(url, f"more than {max_bytes} bytes", max_bytes)
            out.write(chunk)
            bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise _Retry(f"ended early: {part.stat().st_size} of {total} bytes")


def _too_large(url: str, size: str, max_bytes: int) -> UserError:
    return UserError(f"{url} is {size}, more than data.max_unpacked_gb ({max_bytes / 1e9:.3g} GB); nothing "
                     "was kept. Raise data.max_unpacked_gb in params.yaml if the dataset is really that large")


def short_name(key: str, name: str, limit: int = 120) -> str:
    """`<key>-<name>`, the name shortened from its start so the file (and its `.part.json`) fits any
    file system's name limit; the key (a hash of the URL) keeps it unique."""
    while len(os.fsencode(f"{key}-{name}")) > limit:
        name = name[1:]
    return f"{key}-{name}"
