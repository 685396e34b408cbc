"""fetch: get the raw dataset into `out_dir` (e.g. data/raw), checksum-verified, atomically.

Sources are tried in order; a local path that does not exist or a URL that cannot be reached
moves on to the next one, while a checksum mismatch stops with an error (a wrong file is not a
reason to try elsewhere silently). A known dataset (`tlpipe.data.DATASETS`, e.g. fashion-mnist)
fetches its files from a local directory or a base URL and checks each against its known
sha256; any other dataset is one local path (a directory or a file) or one URL, with an optional
`sha256`. Archives (.zip, .tar, .tar.gz, .tgz, …) are unpacked.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit

from tlpipe import fsio
from tlpipe.data import DATASETS, DatasetSpec
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
                    _fetch_known(spec, source, tmp, cfg.timeout)
                else:
                    _fetch_custom(source, tmp, cfg)
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


def _fetch_known(spec: DatasetSpec, source: str, dest: Path, timeout: float) -> None:
    """Copy or download every file of `spec` into the new dir `dest`, checking each one."""
    if not is_url(source) and not Path(source).is_dir():
        raise Unreachable("no such directory")
    dest.mkdir()
    for name, expected in spec.files.items():
        if is_url(source):
            download(source.rstrip("/") + "/" + name, dest / name, timeout=timeout)
            path = dest / name
        else:
            path = _copy_known(Path(source), name, dest)
        verify_sha256(path, expected, content=True)


def _copy_known(src_dir: Path, name: str, dest: Path) -> Path:
    """Copy `name` (or its un-gzipped variant) from `src_dir` into `dest`."""
    for candidate in (name, name.removesuffix(".gz")):
        if (src_dir / candidate).is_file():
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
        shutil.copytree(source, dest)
        return
    dest.mkdir()
    name = Path(urlsplit(source).path).name if is_url(source) else Path(source).name
    target = dest / (name or "download")
    if is_url(source):
        download(source, target, sha256=cfg.sha256, timeout=cfg.timeout)
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


# ---------------------------------------------------------------------------- transfer


def download(url: str, dest: Path, *, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Stream `url` into `dest` via a temp file (with a progress bar on a TTY).

    Args:
        url: An http(s) URL.
        dest: Where the file ends up; it appears only once complete and verified.
        sha256: If given, the expected sha256 of the downloaded bytes.
        timeout: Seconds to wait for the server.

    Raises:
        Unreachable: The server cannot be reached, answers with an error, or the transfer breaks.
        TlpipeError: The file does not match `sha256`.
    """
    from tqdm import tqdm

    with fsio.atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0) or None
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                           disable=not sys.stderr.isatty())  # fmt: skip
                with bar:
                    while block := response.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as e:
            raise Unreachable(f"download of {url} failed ({e})") from e
        if total is not None and tmp.stat().st_size != total:
            raise Unreachable(f"download of {url} broke off at {tmp.stat().st_size}/{total} bytes")
        if sha256:
            verify_sha256(tmp, sha256, name=url)
    return dest


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
