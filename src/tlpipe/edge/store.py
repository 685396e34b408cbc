"""The model directory on a device: installed versions, and which one serves.

Layout::

    DIR/versions/tlpipe-v3-fp32/model.onnx   one folder per installed version and variant
    DIR/versions/tlpipe-v3-fp32/install.json name, version, variant, sha256, tags, when
    DIR/current  -> versions/tlpipe-v3-fp32  what `predict` and `bench` serve
    DIR/previous -> versions/tlpipe-v2-fp32  what `rollback` returns to
    DIR/rolled-back                          the version rolled back from: `pull` skips it

A version folder is complete before it gets its name (staged under versions/.staging-*, then
renamed), and `current` is switched by renaming a new symlink over it (atomic on POSIX), so a
reader sees the old model or the new one, never half of one; a process that loaded the old
model keeps it, and the old folder stays as `previous`. Older versions are deleted.
One `pull` or `rollback` at a time holds DIR/.lock.

Who may read it: the user that pulls (often root's cron) is rarely the one that serves. A
version folder gets mode 0755 and its files 0644, or, with env `TLPIPE_EDGE_GROUP` (a group
name or id), that group and modes 0750/0640: readable by the serving user's group only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError

MODEL_FILE, INFO_FILE = "model.onnx", "install.json"
GROUP_ENV = "TLPIPE_EDGE_GROUP"
CURRENT, PREVIOUS, ROLLED_BACK = "current", "previous", "rolled-back"


@dataclasses.dataclass(frozen=True)
class Installed:
    """One installed model version."""

    name: str
    version: str
    variant: str
    sha256: str
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    installed_at: str = ""

    @property
    def slot(self) -> str:
        """The folder name under versions/."""
        return slot_name(self.name, self.version, self.variant)

    def __str__(self) -> str:
        return f"{self.name} v{self.version} ({self.variant})"


def slot_name(name: str, version: str, variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{name}-v{version}-{variant}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ModelStore:
    """A device's model directory (created on first install)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.versions = self.root / "versions"

    def current(self) -> Installed | None:
        return self._read(CURRENT)

    def previous(self) -> Installed | None:
        return self._read(PREVIOUS)

    def model_path(self) -> Path:
        """The serving model file, resolved now (a swap later does not change it)."""
        link = self.root / CURRENT
        if not link.exists():
            raise TlpipeError(
                f"no model installed in {self.root}: run `tlpipe-edge pull` "
                "(or pass a model.onnx path)"
            )
        return (link / MODEL_FILE).resolve()

    def path(self, installed: Installed) -> Path:
        return self.versions / installed.slot / MODEL_FILE

    def has_intact(self, installed_slot: str, sha256: str) -> bool:
        """Whether versions/<slot> holds a model file with this sha256."""
        model = self.versions / installed_slot / MODEL_FILE
        return model.is_file() and file_sha256(model) == sha256

    def rolled_back(self) -> str:
        """The slot `rollback` left (pull does not reinstall it unless forced); "" if none."""
        marker = self.root / ROLLED_BACK
        return marker.read_text().strip() if marker.is_file() else ""

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold DIR/.lock: one pull or rollback at a time (a second one fails at once)."""
        import fcntl

        self.versions.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise TlpipeError(
                    f"another tlpipe-edge pull or rollback is working on "
                    f"{self.root}; try again when it is done"
                ) from e
            yield

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A temporary folder under versions/ to build a version in; removed afterwards."""
        staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.versions))
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def install(self, staged: Path | None, installed: Installed) -> None:
        """Make `installed` current (from `staged`, or its existing folder); old current → previous.

        Call under `lock()`. `staged` must hold MODEL_FILE, verified by the caller.
        """
        slot = self.versions / installed.slot
        if staged is not None:
            info = {
                **dataclasses.asdict(installed),
                "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            _write_durably(staged / INFO_FILE, json.dumps(info, indent=2).encode())
            _fsync(staged / MODEL_FILE)
            share(staged)
            shutil.rmtree(slot, ignore_errors=True)  # a damaged copy of this version
            os.replace(staged, slot)
        old = self.current()
        if old is not None and old.slot != installed.slot:
            self._point(PREVIOUS, old.slot)
        self._point(CURRENT, installed.slot)
        (self.root / ROLLED_BACK).unlink(missing_ok=True)
        self._prune()

    def rollback(self) -> tuple[Installed, Installed]:
        """Swap current and previous; returns (now serving, rolled back from). Under `lock()`."""
        cur, prev = self.current(), self.previous()
        if cur is None or prev is None:
            raise TlpipeError(
                f"nothing to roll back to in {self.root}: it needs two installed "
                "versions (`tlpipe-edge pull` keeps the one it replaces)"
            )
        self._point(PREVIOUS, cur.slot)
        self._point(CURRENT, prev.slot)
        _write_durably(self.root / ROLLED_BACK, cur.slot.encode())
        return prev, cur

    def _read(self, link: str) -> Installed | None:
        info = self.root / link / INFO_FILE
        if not info.is_file():
            return None
        try:
            data: dict[str, Any] = json.loads(info.read_text())
            fields = {f.name for f in dataclasses.fields(Installed)}
            return Installed(**{k: v for k, v in data.items() if k in fields})
        except (ValueError, TypeError) as e:
            raise TlpipeError(f"{info} is damaged ({e}); pull again with --force") from e

    def _point(self, link: str, slot: str) -> None:
        tmp = self.root / f".{link}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(Path("versions") / slot, tmp)
        os.replace(tmp, self.root / link)
        _fsync_dir(self.root)

    def _prune(self) -> None:
        """Delete version folders neither current nor previous (and dead staging folders)."""
        keep = {os.path.realpath(self.root / link) for link in (CURRENT, PREVIOUS)}
        for entry in self.versions.iterdir():
            if os.path.realpath(entry) not in keep:
                shutil.rmtree(entry, ignore_errors=True)


def share(folder: Path) -> None:
    """Let the serving user read `folder` (a version) and the folders above it: group
    `TLPIPE_EDGE_GROUP` with 0750/0640 when set, else 0755/0644 (a model is not a secret;
    mkdtemp's 0700 would hide it from every other user)."""
    group = os.environ.get(GROUP_ENV, "").strip()
    gid = -1
    if group:
        import grp

        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError as e:
            raise TlpipeError(f"{GROUP_ENV}={group}: no such group on this device") from e
    dirs, files = (0o750, 0o640) if group else (0o755, 0o644)
    for path in [folder, *folder.rglob("*")]:
        if gid >= 0:
            os.chown(path, -1, gid)
        path.chmod(dirs if path.is_dir() else files)
    for parent in (folder.parent, folder.parent.parent):  # versions/ and the model dir
        if gid >= 0 and parent.stat().st_uid == os.geteuid():
            os.chown(parent, -1, gid)
        if parent.stat().st_uid == os.geteuid():
            parent.chmod((parent.stat().st_mode & 0o7777) | (dirs & 0o055))


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
