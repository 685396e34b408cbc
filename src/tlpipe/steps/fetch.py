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

import hashlib
import os
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tlpipe import fsio
from tlpipe.data import DATASETS, DatasetSpec
from tlpipe.download import ARCHIVES, Unreachable, download, verify_sha256
from tlpipe.errors import TlpipeError
from tlpipe.params import FetchConfig
from tlpipe.readers import check_inside
from tlpipe.steps import StepResult


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
    if target.name.lower().endswith(ARCHIVES):
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
