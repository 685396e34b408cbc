"""fetch: get the scenario's datasets into `out_dir` (e.g. data/raw), verified, atomically.

Each side (`fetch.source`, `fetch.target`) goes to its own folder, ``out_dir/source`` and
``out_dir/target``, described by ``out_dir/source.json`` / ``target.json`` (dataset name and
format: what prepare reads). When target and source are the same dataset (the benchmark's class
split) it is fetched once and ``target.json`` says so; with no source dataset, ``source.json``
says that.

Sources are tried in order; a local path that does not exist or a URL that cannot be reached
moves on to the next one, while a checksum mismatch stops with an error (a wrong file is not a
reason to try elsewhere silently). A known dataset (`tlpipe.data.prepared.DATASETS`, e.g.
fashion-mnist) fetches its files from a local directory or a base URL and checks each against
its known sha256; any other dataset is one local path (a directory or a file), one http(s)
URL, or one
``s3://bucket/prefix`` (an object or every object under the prefix, read with boto3), with an
optional `sha256`. Archives (.zip, .tar, .tar.gz, .tgz, …) are unpacked. A local manifest file
(manifest format) brings only the images it lists.

The data is untrusted. Symlinks that lead out of a source folder (or out of an unpacked archive)
are refused, as are empty folders (DVC does not store them, so a restored data/raw would differ
and class ids would shift). A download must be provably whole: its Content-Length, its `sha256`,
or else a format that can be read to the end (zip, npz, gzip, tar); and it must finish
within `fetch.deadline` seconds, however slowly the server trickles bytes.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from tlpipe import fsio
from tlpipe.data import s3
from tlpipe.data.download import ARCHIVES, Unreachable, download, verify_sha256
from tlpipe.data.image_files import MANIFEST_NAMES, check_inside, read_manifest_rows
from tlpipe.data.prepared import DATASETS, DatasetSpec
from tlpipe.data.readers import SIDES, write_side
from tlpipe.errors import TlpipeError
from tlpipe.params import DataSpec, FetchConfig
from tlpipe.steps import StepResult


@dataclass(frozen=True)
class FetchResult(StepResult):
    """What fetch wrote: the raw dir, its files, the source that served each side, and the
    data's version (a sha256 over every file's relative path and sha256: the Kubeflow cache
    key)."""

    out_dir: Path
    files: tuple[Path, ...]
    sources: dict[str, str]
    version: str


def run(cfg: FetchConfig, out_dir: Path) -> FetchResult:
    """Fetch both sides of the scenario into `out_dir`, replacing it once all is verified."""
    out_dir = Path(out_dir)
    served: dict[str, str] = {}
    with fsio.atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for side in SIDES:
            spec = getattr(cfg, side)
            if spec is None:
                desc: dict[str, Any] = {"dataset": None}
            elif side == "target" and cfg.one_dataset:
                desc = {"same_as": "source"}
            else:
                served[side] = _fetch_side(spec, tmp / side, cfg, f"fetch.{side}")
                desc = {"dataset": spec.dataset, "format": data_format(spec, side)}
            write_side(tmp, side, desc)
    return _result(out_dir, served)


def data_format(spec: DataSpec, side: str) -> str:
    """The spec's format, or its known dataset's."""
    known = DATASETS.get(spec.dataset)
    fmt = spec.format or (known.format if known else None)
    if fmt is None:
        raise TlpipeError(
            f"fetch.{side}.format: set it for dataset {spec.dataset!r} "
            "(imagefolder, manifest, npz or idx)"
        )
    return fmt


def _fetch_side(spec: DataSpec, dest: Path, cfg: FetchConfig, where: str) -> str:
    """Fetch one side's data into the new folder `dest`; returns the source that served it."""
    known = DATASETS.get(spec.dataset)
    sources = spec.sources or (known.sources if known else ())
    if not sources:
        raise TlpipeError(f"set {where}.sources to a local path or URL for {spec.dataset!r}")
    if known and spec.sha256:
        raise TlpipeError(f"{where}.sha256 is for custom data; {spec.dataset} has known checksums")
    data_format(spec, where.rsplit(".", 1)[-1])
    failures = []
    for source in sources:
        try:
            if known:
                _fetch_known(known, source, dest, cfg)
            else:
                _fetch_custom(source, dest, spec, cfg)
            _check_fetched(dest, source)
            return source
        except Unreachable as e:
            failures.append(f"{source}: {e}")
            shutil.rmtree(dest, ignore_errors=True)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    raise TlpipeError(
        f"could not fetch {where} ({spec.dataset}) from any source:\n  "
        + "\n  ".join(failures)
        + f"\nset {where}.sources to a directory or URL that holds it"
    )


def _result(out_dir: Path, served: dict[str, str]) -> FetchResult:
    files = tuple(sorted(p for p in out_dir.rglob("*") if p.is_file()))
    metrics = {"files": float(len(files)), "bytes": float(sum(p.stat().st_size for p in files))}
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(out_dir).as_posix()}\0{fsio.sha256_file(path)}\n".encode())
    where = ", ".join(f"{side} from {src}" for side, src in served.items())
    summary = f"fetched {len(files)} files into {out_dir}: {where}"
    return FetchResult(out_dir, files, served, h.hexdigest(), metrics=metrics, summary=summary)


def is_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https", "s3")


# ---------------------------------------------------------------------------- known datasets


def _fetch_known(spec: DatasetSpec, source: str, dest: Path, cfg: FetchConfig) -> None:
    """Copy or download every file of `spec` into the new dir `dest`, checking each one."""
    if not is_url(source) and not Path(source).is_dir():
        raise Unreachable("no such directory")
    dest.mkdir()
    for name, expected in spec.files.items():
        if is_url(source):
            url = source.rstrip("/") + "/" + name
            _download(url, dest / name, None, cfg)
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


def _fetch_custom(source: str, dest: Path, spec: DataSpec, cfg: FetchConfig) -> None:
    """Copy a local dir, or copy/download a single file (checked, unpacked if an archive), or
    every object under an S3 prefix; a local manifest file brings the images it lists."""
    local = not is_url(source)
    if local and not Path(source).exists():
        raise Unreachable("no such file or directory")
    if local and Path(source).is_dir():
        if spec.sha256:
            raise TlpipeError("fetch: sha256 checks a single file, but the source is a directory")
        check_links(Path(source))  # before copying: a secret outside is never even read
        check_not_inside(dest, Path(source))
        shutil.copytree(source, dest)  # follows the (checked) links: data/raw holds files only
        return
    if local and spec.format == "manifest" and Path(source).name in MANIFEST_NAMES:
        _copy_listed(Path(source), dest)
        return
    if source.startswith("s3://") and not spec.sha256 and s3.is_prefix(source, cfg.timeout):
        s3.download_prefix(source, dest, timeout=cfg.timeout, deadline=cfg.deadline)
        return
    dest.mkdir()
    name = Path(urlsplit(source).path).name if not local else Path(source).name
    target = dest / (name or "download")
    if local:
        shutil.copyfile(source, target)
        if spec.sha256:
            verify_sha256(target, spec.sha256)
    else:
        _download(source, target, spec.sha256, cfg)
    if target.name.lower().endswith(ARCHIVES):
        unpack(target, dest, cfg.max_unpack_bytes, cfg.max_unpack_ratio)


def _download(url: str, target: Path, sha256: str | None, cfg: FetchConfig) -> None:
    if url.startswith("s3://"):
        s3.download_object(url, target, timeout=cfg.timeout, deadline=cfg.deadline)
        if sha256:
            verify_sha256(target, sha256)
    else:
        download(url, target, sha256=sha256, timeout=cfg.timeout, deadline=cfg.deadline)


def _copy_listed(manifest: Path, dest: Path) -> None:
    """Copy a manifest file and the images it lists (each inside the manifest's folder)."""
    root = manifest.parent
    dest.mkdir()
    for rel, _label, _split in read_manifest_rows(manifest):
        src = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not src.is_file():
            raise TlpipeError(f"{manifest}: path {rel!r} is not a file inside {root}")
        check_inside(src, root)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / rel)
    shutil.copyfile(manifest, dest / manifest.name)


def unpack(
    archive: Path, dest: Path, max_bytes: int = 20_000_000_000, max_ratio: float = 200.0
) -> None:
    """Unpack a zip/tar archive into `dest`, delete it, and lift a lone top-level folder.

    Streamed, member by member, under caps: at most `max_bytes` in all and at most `max_ratio`
    times the archive's size (a zip bomb stops at the first block over). Zip and tar follow
    one member rule (`_member_path`, `_link_target`): no absolute paths, no ``..``, no link
    that leads out, no devices.
    """
    budget = _Budget(archive, max_bytes, max_ratio)
    try:
        if archive.name.lower().endswith(".zip"):
            _unzip(archive, dest, budget)
        else:
            _untar(archive, dest, budget)
    except _UNPACK_ERRORS as e:
        raise TlpipeError(f"{archive.name}: cannot unpack ({e})") from e
    archive.unlink()
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        lone = entries[0].rename(dest / f".{entries[0].name}.unpacked")
        for child in lone.iterdir():
            child.rename(dest / child.name)
        lone.rmdir()


_UNPACK_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
)


class _Budget:
    """Bytes an archive may still unpack to (`fetch.max_unpack_bytes` / `max_unpack_ratio`)."""

    def __init__(self, archive: Path, max_bytes: int, max_ratio: float):
        self.archive, self.max_bytes, self.max_ratio = archive, max_bytes, max_ratio
        self.size = archive.stat().st_size
        self.written = 0

    def take(self, n: int) -> None:
        self.written += n
        if self.written > self.max_bytes:
            raise TlpipeError(
                f"{self.archive.name}: refused, it unpacks to more than fetch.max_unpack_bytes "
                f"= {self.max_bytes:,} bytes; raise the limit if the data is genuine"
            )
        if self.written > self.max_ratio * self.size + (1 << 20):
            raise TlpipeError(
                f"{self.archive.name}: refused, it unpacks to more than fetch.max_unpack_ratio "
                f"= {self.max_ratio:g} x its {self.size:,} bytes (a zip bomb?); raise the ratio "
                "if the data is genuine"
            )

    def copy(self, src: BinaryIO, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as out:
            while block := src.read(1 << 20):
                self.take(len(block))
                out.write(block)


def _refuse(archive: Path, name: str, why: str) -> TlpipeError:
    return TlpipeError(
        f"{archive.name}: cannot unpack: member {name!r} {why}; refused (an archive may not "
        "write outside its folder)"
    )


def _member_path(archive: Path, dest: Path, name: str) -> Path:
    """Where member `name` goes under `dest`: refused if absolute or if it climbs out."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (parts and len(parts[0]) == 2 and parts[0][1] == ":"):
        raise _refuse(archive, name, "has an absolute path")
    if ".." in parts:
        raise _refuse(archive, name, "climbs out with '..'")
    return dest.joinpath(*[p for p in parts if p not in ("", ".")])  # "." is `dest` itself


def _link_target(archive: Path, dest: Path, name: str, path: Path, target: str) -> str:
    """A symlink member's target, if it stays inside `dest` (else refused)."""
    if os.path.isabs(target) or target.startswith("\\"):
        raise _refuse(archive, name, f"is a link out of the archive (to {target})")
    resolved = os.path.normpath(os.path.join(path.parent, target))
    if os.path.commonpath([resolved, str(dest)]) != str(dest):
        raise _refuse(archive, name, f"is a link out of the archive (to {target})")
    return target


def _unzip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            path = _member_path(archive, dest, info.filename)
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
            elif stat.S_ISLNK(info.external_attr >> 16):
                target = z.read(info)[:4096].decode("utf-8", "replace")
                _link_target(archive, dest, info.filename, path, target)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.symlink_to(target)
            else:
                with z.open(info) as src:
                    budget.copy(src, path)


def _untar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive) as t:
        for member in t:
            path = _member_path(archive, dest, member.name)
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
            elif member.issym():
                _link_target(archive, dest, member.name, path, member.linkname)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.symlink_to(member.linkname)
            elif member.islnk():  # a hard link: a copy of a member unpacked before it
                linked = _member_path(archive, dest, member.linkname)
                if not linked.is_file() or linked.is_symlink():
                    raise _refuse(archive, member.name, f"links to {member.linkname!r}, no file")
                with open(linked, "rb") as src:
                    budget.copy(src, path)
            elif member.isfile():
                src = t.extractfile(member)
                assert src is not None  # a regular file always has content
                budget.copy(src, path)
            else:
                raise _refuse(archive, member.name, "is a device or pipe, not a file")


def check_not_inside(dest: Path, source: Path) -> None:
    """Refuse a source folder that holds fetch's own output: it would copy itself into itself."""
    top = os.path.realpath(source)
    if os.path.commonpath([os.path.realpath(dest.parent), top]) == top:
        raise TlpipeError(
            f"{source} holds fetch's output (in {dest.parent.parent}): copying it would copy the "
            "copy into itself; point the sources at the data folder alone"
        )


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
        raise TlpipeError(f"{source} holds no files: point fetch's sources at the data")
