"""Downloads that end: an overall deadline, and proof that what arrived is complete.

`download` streams a URL to a file with a per-read timeout *and* an overall deadline (a timer
shuts the sockets down, so a server trickling headers or body is stopped too), then
`check_complete` proves the file whole before anyone renames it into place: a matching
Content-Length, chunked encoding, a matching sha256, or the format read to its end.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.client
import lzma
import socket
import sys
import tarfile
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from http.client import HTTPException
from pathlib import Path

from tlpipe import fsio
from tlpipe.errors import TlpipeError

# ---------------------------------------------------------------------------- transfer


ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class Unreachable(TlpipeError):
    """A source that is missing or cannot be downloaded from: fetch tries the next one."""


class _Deadline:
    """Shuts a download's sockets down `seconds` after it starts.

    The per-read `timeout` cannot stop a server that sends a byte every few seconds, in the
    body or in the headers; shutting the socket down wakes whichever read is blocked. (A TLS
    handshake is covered by `timeout` only.)
    """

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)
        return sock

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's usual opener (proxies, redirects), its connections watched by this deadline."""
        return urllib.request.build_opener(_WatchedHandler(self.watch))


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class _Watched:
    """Connection mixin: hands its socket to `watch`, from the TCP connect on."""

    def __init__(self, *args, watch, **kwargs):
        super().__init__(*args, **kwargs)
        self._watch, create = watch, self._create_connection
        self._create_connection = lambda *a, **k: watch(create(*a, **k))

    def connect(self) -> None:
        super().connect()
        self._watch(self.sock)  # the TLS socket, for https


class _HTTP(_Watched, http.client.HTTPConnection):
    pass


class _HTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _WatchedHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http and https handlers, with watched connections (see `_Deadline`)."""

    def __init__(self, watch):
        super().__init__()
        self.watch = watch

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTP, watch=self.watch), req)

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPS, watch=self.watch), req, context=self._context)


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    timeout: float = 60.0,
    deadline: float = 3600.0,
) -> Path:
    """Stream `url` into `dest` via a temp file (with a progress bar on a TTY).

    Args:
        url: An http(s) URL.
        dest: Where the file ends up; it appears only once complete and verified.
        sha256: If given, the expected sha256 of the downloaded bytes.
        timeout: Seconds to wait for the server on each read.
        deadline: Seconds the whole download may take.

    Raises:
        Unreachable: The server cannot be reached, answers with an error, is too slow, or the
            transfer breaks off (a short Content-Length, or without one an unreadable file).
        TlpipeError: The file does not match `sha256`.
    """
    from tqdm import tqdm

    with fsio.atomic_path(dest) as tmp, _Deadline(deadline) as clock:
        try:
            with clock.opener().open(url, timeout=timeout) as response, open(tmp, "wb") as f:
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None else None
                chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
                bar = tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=dest.name,
                    disable=not sys.stderr.isatty(),
                )
                with bar:
                    while block := response.read1(1 << 20):  # read1: whatever has arrived
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as e:
            if not clock.expired:
                raise Unreachable(f"download of {url} failed ({e})") from e
        if clock.expired:
            raise Unreachable(f"download of {url} took over fetch.deadline = {deadline:g} s")
        if total is not None and tmp.stat().st_size != total:
            raise Unreachable(f"download of {url} broke off at {tmp.stat().st_size}/{total} bytes")
        if sha256:
            verify_sha256(tmp, sha256, name=url)
        elif total is None and not chunked:  # the server just closed: was that the end?
            check_complete(tmp, dest.name, url)
    return dest


def check_complete(path: Path, name: str, url: str) -> None:
    """Read a file of a known format (by `name`) to its end; raise Unreachable if it is cut short.

    Raises:
        Unreachable: The file is truncated or damaged, or its format cannot be checked.
    """
    name = name.lower()
    try:
        if name.endswith((".zip", ".npz")):
            with zipfile.ZipFile(path) as z:  # the central directory is at the very end
                if bad := z.testzip():
                    raise ValueError(f"member {bad} fails its CRC")
        elif name.endswith(ARCHIVES):
            _read_tar(path)
        elif name.endswith(".gz"):
            with gzip.open(path) as f:  # the gzip trailer holds the CRC and the length
                while f.read(1 << 20):
                    pass
        else:
            raise Unreachable(
                f"{url} came without Content-Length or fetch.sha256, and a file named {name} "
                "cannot be checked for completeness: set fetch.sha256"
            )
    except (
        OSError,
        EOFError,
        ValueError,
        zlib.error,
        lzma.LZMAError,
        zipfile.BadZipFile,
        tarfile.TarError,
    ) as e:
        raise Unreachable(f"download of {url} is cut short or damaged ({e})") from e


def _read_tar(path: Path) -> None:
    """Read every member and the end-of-archive block (a cut at a member boundary reads fine)."""
    with tarfile.open(path) as t:
        for member in t:
            if member.isfile() and (f := t.extractfile(member)):
                while f.read(1 << 20):
                    pass
        t.fileobj.seek(t.offset)
        if t.fileobj.read(512) != bytes(512):
            raise ValueError("no end-of-archive block")
        while t.fileobj.read(1 << 20):  # to the end of a compressed stream: its checksum
            pass


def verify_sha256(path: Path, expected: str, content: bool = False, name: str = "") -> None:
    """Raise TlpipeError unless `path` hashes to `expected` (`content`: hash gunzipped bytes)."""
    actual = content_sha256(path) if content else fsio.sha256_file(path)
    if actual != expected.lower():
        what = "content sha256" if content else "sha256"
        raise TlpipeError(
            f"checksum mismatch for {name or path.name}: {what} is {actual}, expected {expected}; "
            "the file is damaged or not the expected one (nothing was kept)"
        )


def content_sha256(path: Path) -> str:
    """sha256 of a file's content, decompressed first when it is gzipped."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except (OSError, EOFError, zlib.error) as e:
        raise TlpipeError(f"{path}: cannot read ({e}); the file is damaged") from e
    return h.hexdigest()
