"""fetch: get the raw dataset into `out_dir` (e.g. data/raw), checksum-verified, atomically.

Sources are tried in order; a local path that does not exist or a URL that cannot be reached
moves on to the next one, while a checksum mismatch stops with an error (a wrong file is not a
reason to try elsewhere silently). A known dataset (`tlpipe.data.DATASETS`, e.g. fashion-mnist)
fetches its files from a local directory or a base URL and checks each against its known
sha256; any other dataset is one local path (a directory or a file) or one URL, with an optional
`sha256`. Archives (.zip, .tar, .tar.gz, .tgz, …) are unpacked.

The data is untrusted. Symlinks that lead out of a source folder (or out of an unpacked archive)
are refused, as are empty folders (DVC does not store them, so a restored data/raw would differ
and class ids would shift). A download must be provably whole: its Content-Length, its `sha256`,
or else a format that can be read to the end (zip, npz, gzip, tar); and it must finish
within `fetch.deadline` seconds, however slowly the server trickles bytes.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import socket
import sys
import tarfile
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit

from tlpipe import fsio
from tlpipe.data import DATASETS, DatasetSpec, check_inside
from tlpipe.errors import TlpipeError
from tlpipe.params import FetchConfig
from tlpipe.steps import StepResult

_ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class Unreachable(TlpipeError):
    """A source that is missing or cannot be downloaded from: fetch tries the next one."""


@dataclass(frozen=True)
class FetchResult(StepResult):
    """What fetch wrote: the raw dir, its files, the source that served them, and the data's
    version (a sha256 over every file's relative path and sha256: the Kubeflow cache key)."""

    out_dir: Path
    files: tuple[Path, ...]
    source: str
    version: str


def run(cfg: FetchConfig, out_dir: Path) -> FetchResult:
    """Fetch `cfg.dataset` into `out_dir`, replacing it only once everything is verified."""
    spec = DATASETS.get(cfg.dataset)
    sources = cfg.sources or (spec.sources if spec else ())
    if not sources:
        raise TlpipeError(f"set fetch.sources to a local path or URL for dataset {cfg.dataset!r}")
    if spec and cfg.sha256:
        raise TlpipeError(f"fetch.sha256 is for custom data; {cfg.dataset} has known checksums")
    out_dir = Path(out_dir)
    failures = []
    for source in sources:
        try:
            with fsio.atomic_path(out_dir) as tmp:
                if spec:
                    _fetch_known(spec, source, tmp, cfg)
                else:
                    _fetch_custom(source, tmp, cfg)
                _check_fetched(tmp, source)
            return _result(out_dir, source)
        except Unreachable as e:
            failures.append(f"{source}: {e}")
    raise TlpipeError(
        f"could not fetch {cfg.dataset} from any source:\n  " + "\n  ".join(failures)
        + "\nset fetch.sources to a directory or URL that holds it"
    )  # fmt: skip


def _result(out_dir: Path, source: str) -> FetchResult:
    files = tuple(sorted(p for p in out_dir.rglob("*") if p.is_file()))
    metrics = {"files": float(len(files)), "bytes": float(sum(p.stat().st_size for p in files))}
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(out_dir).as_posix()}\0{fsio.sha256_file(path)}\n".encode())
    summary = f"fetched {len(files)} files into {out_dir} from {source}"
    return FetchResult(out_dir, files, source, h.hexdigest(), metrics=metrics, summary=summary)


def is_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https")


# ---------------------------------------------------------------------------- known datasets


def _fetch_known(spec: DatasetSpec, source: str, dest: Path, cfg: FetchConfig) -> None:
    """Copy or download every file of `spec` into the new dir `dest`, checking each one."""
    if not is_url(source) and not Path(source).is_dir():
        raise Unreachable("no such directory")
    dest.mkdir()
    for name, expected in spec.files.items():
        if is_url(source):
            url = source.rstrip("/") + "/" + name
            download(url, dest / name, timeout=cfg.timeout, deadline=cfg.deadline)
            path = dest / name
        else:
            path = _copy_known(Path(source), name, dest)
        verify_sha256(path, expected, content=True)


def _copy_known(src_dir: Path, name: str, dest: Path) -> Path:
    """Copy `name` (or its un-gzipped variant) from `src_dir` into `dest`."""
    for candidate in (name, name.removesuffix(".gz")):
        if (src_dir / candidate).is_file():  # a link is fine: its content is checksummed
            return Path(shutil.copyfile(src_dir / candidate, dest / candidate))
    raise Unreachable(f"{name} is not there")


# ---------------------------------------------------------------------------- custom data


def _fetch_custom(source: str, dest: Path, cfg: FetchConfig) -> None:
    """Copy a local dir, or copy/download a single file (checked, unpacked if an archive)."""
    if not is_url(source) and not Path(source).exists():
        raise Unreachable("no such file or directory")
    if not is_url(source) and Path(source).is_dir():
        if cfg.sha256:
            raise TlpipeError("fetch.sha256 checks a single file, but the source is a directory")
        check_links(Path(source))  # before copying: a secret outside is never even read
        shutil.copytree(source, dest)  # follows the (checked) links: data/raw holds files only
        return
    dest.mkdir()
    name = Path(urlsplit(source).path).name if is_url(source) else Path(source).name
    target = dest / (name or "download")
    if is_url(source):
        download(source, target, sha256=cfg.sha256, timeout=cfg.timeout, deadline=cfg.deadline)
    else:
        shutil.copyfile(source, target)
        if cfg.sha256:
            verify_sha256(target, cfg.sha256)
    if target.name.lower().endswith(_ARCHIVES):
        unpack(target, dest)


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a zip/tar archive into `dest`, delete it, and lift a lone top-level folder."""
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(dest)
        else:
            with tarfile.open(archive) as t:
                t.extractall(dest, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        raise TlpipeError(f"{archive.name}: cannot unpack ({e})") from e
    archive.unlink()
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        lone = entries[0].rename(dest / f".{entries[0].name}.unpacked")
        for child in lone.iterdir():
            child.rename(dest / child.name)
        lone.rmdir()


def check_links(root: Path) -> None:
    """Refuse symlinks under `root` that lead out of it, dangle, or loop back into a parent."""
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            link = Path(folder) / name
            if not link.is_symlink():
                continue
            check_inside(link, root)
            target = os.path.realpath(link)
            if not os.path.exists(target):
                raise TlpipeError(f"{link} is a broken symlink: fix or remove it")
            if os.path.commonpath([target, os.path.realpath(folder)]) == target:
                raise TlpipeError(f"{link} is a symlink to a folder that holds it: remove it")


def _check_fetched(tree: Path, source: str) -> None:
    """What fetch keeps must be what DVC restores: no links out, no empty folders, some files."""
    check_links(tree)  # an unpacked archive may hold links too
    n_files = 0
    for folder, dirs, files in os.walk(tree):
        n_files += len(files)
        if not dirs and not files and Path(folder) != tree:
            raise TlpipeError(
                f"{source}: folder {Path(folder).relative_to(tree)} is empty; DVC does not store "
                "empty folders, so it would vanish from data/raw (and shift class ids): add its "
                "files or delete it"
            )
    if n_files == 0:
        raise TlpipeError(f"{source} holds no files: point fetch.sources at the data")


# ---------------------------------------------------------------------------- transfer


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
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                           disable=not sys.stderr.isatty())  # fmt: skip
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
        elif name.endswith(_ARCHIVES):
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
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zipfile.BadZipFile,
            tarfile.TarError) as e:  # fmt: skip
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
