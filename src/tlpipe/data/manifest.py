"""manifest.json and source.json: what `prepare` made, read by every later step.

`Manifest` is the one definition of the prepared data's record: its keys, their defaults and
its schema version. `prepare` writes it (`to_dict`), the steps read it (`load_manifest`) and
use attributes, never string keys. `from_dict` still reads the files of older tlpipe versions:

- version 1: one dataset split by class (no per-side descriptions, no image sizes, no
  duplicates report); the scenario config was flat (`dataset`, `format`,
  `source_classes`, `target_classes`).
- version 2: a source spec and a target spec (`source`, `target`), image sizes and
  duplicates.

`SourceManifest` is ``source.json``, the part of the manifest that pretraining reads: it (and
the source splits, `SOURCE_FILES`) changes only when the source data does, so pretrain is not
re-run when only the target grows. Its ``dataset_sha256`` is the source data's version.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlpipe import fsio
from tlpipe.data.prepared import ARRAYS
from tlpipe.errors import TlpipeError

MANIFEST_VERSION = 2
SOURCE_FILES = (
    "source.json",
    *(f"{s}.{a}.npy" for s in ("source", "source_val") for a in (*ARRAYS, "id")),
)


@dataclass(frozen=True, kw_only=True)
class Side:
    """One side's data (`source` or `target`) as prepare found it.

    Attributes:
        dataset: The dataset's name (`fetch.<side>.dataset`).
        format: Its raw layout (idx, npz, imagefolder, manifest).
        class_ids: The classes taken, as ids of the raw data's classes.
        classes: Their names in the raw data.
        names: Their names as the scenario calls them (`prepare.<side>.names`).
        images: Labelled images in the raw data.
        own_test_set: Whether the raw data has its own test set.
    """

    dataset: str | None
    format: str | None
    class_ids: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    images: int = 0
    own_test_set: bool = False


@dataclass(frozen=True, kw_only=True)
class SplitRecord:
    """One prepared split: its size, content hash and images per class."""

    count: int
    sha256: str
    per_class: tuple[int, ...]


class _Shape:
    """What both records say about the images: shape, channels, size, source classes."""

    input_shape: tuple[int, int, int]
    source_classes: tuple[str, ...]

    @property
    def in_chans(self) -> int:
        """Channels of the prepared images."""
        return self.input_shape[0]

    @property
    def input_size(self) -> int:
        """Side of the (square) prepared images, in pixels."""
        return self.input_shape[1]

    @property
    def has_source(self) -> bool:
        """Whether the scenario has a source dataset (else only a pretrained backbone)."""
        return bool(self.source_classes)


@dataclass(frozen=True, kw_only=True)
class SourceManifest(_Shape):
    """``source.json``: the manifest's source part (what pretrain reads)."""

    source: Side | None = None
    source_classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path = "source.json") -> SourceManifest:
        values = _required(data, cls, where)
        values["source"] = _side(data.get("source"))
        return cls(**_tuples(values))


@dataclass(frozen=True, kw_only=True)
class Manifest(_Shape):
    """``manifest.json``: the prepared scenario.

    Attributes:
        version: The schema version (`MANIFEST_VERSION` when written by this tlpipe).
        dataset: The target's dataset name.
        one_dataset: Source and target come from one dataset, split by class.
        source: The source side (None: no source dataset, a pretrained backbone instead).
        target: The target side.
        scenario: The `prepare:` config that made it, as data.
        source_classes: Source class names, by label.
        target_classes: Target class names, by label.
        input_shape: (C, H, W) of every prepared image; H == W.
        mean: Per-channel mean of the training images (source, else target train), in [0, 1].
        std: Per-channel standard deviation, likewise.
        image_sizes: Per side, the images' stored sizes before resizing
            (`tlpipe.data.splitting.size_summary`); empty before version 2.
        duplicates: Images (same bytes) found in more than one split
            (`tlpipe.data.splitting.duplicates`); empty before version 2.
        splits: Split name → its `SplitRecord`.
        dataset_sha256: The prepared data's version: a hash over the splits' hashes.
    """

    version: int = MANIFEST_VERSION
    dataset: str | None
    one_dataset: bool
    source: Side | None
    target: Side
    scenario: dict[str, Any]
    source_classes: tuple[str, ...]
    target_classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, SplitRecord]
    dataset_sha256: str

    def requested(self) -> dict[str, tuple[Any, Any, Any]]:
        """What the scenario asked for, per side: (dataset, format, the classes named in the
        config; empty = every class of the data)."""
        sc = self.scenario
        out = {}
        for name in ("source", "target"):
            side = self.source if name == "source" else self.target
            asked = sc.get(f"{name}_classes") if self.version < 2 else sc[name]["classes"]
            out[name] = (side.dataset if side else None, side.format if side else None, asked)
        return out

    def source_part(self, dataset_sha256: str) -> SourceManifest:
        """The `SourceManifest` of this manifest, versioned by the source splits' hash."""
        return SourceManifest(
            source=self.source,
            source_classes=self.source_classes,
            input_shape=self.input_shape,
            mean=self.mean,
            std=self.std,
            dataset_sha256=dataset_sha256,
        )

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path = "manifest.json") -> Manifest:
        """Read a manifest of any version this tlpipe knows (see the module docstring)."""
        version = data.get("version", 1)
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise TlpipeError(
                f"{where}: manifest version {version!r} is newer than this tlpipe reads "
                f"({MANIFEST_VERSION}): upgrade tlpipe or run `tlpipe prepare` again"
            )
        if version < 2:  # one dataset: its name and format were in the flat scenario
            sc = data.get("scenario") or {}
            side = {"dataset": sc.get("dataset", data.get("dataset")), "format": sc.get("format")}
            data = {"one_dataset": True, "source": side, "target": side, **data}
        values = _required(data, cls, where)
        values["version"] = version
        values["source"] = _side(data.get("source"))
        values["target"] = _side(data["target"])
        try:
            values["splits"] = {
                name: SplitRecord(
                    count=s["count"], sha256=s["sha256"], per_class=tuple(s["per_class"])
                )
                for name, s in data["splits"].items()
            }
        except (KeyError, TypeError, AttributeError) as e:
            raise TlpipeError(f"{where}: damaged splits ({e}); run `tlpipe prepare` again") from e
        return cls(**_tuples(values))


def load_manifest(prepared_dir: str | Path) -> Manifest:
    """Read ``manifest.json`` of a prepared dir."""
    path = Path(prepared_dir) / "manifest.json"
    return Manifest.from_dict(fsio.read_json(path), path)


def load_source_manifest(prepared_dir: str | Path) -> SourceManifest:
    """Read ``source.json``: the part of the manifest that pretraining reads."""
    path = Path(prepared_dir) / "source.json"
    return SourceManifest.from_dict(fsio.read_json(path), path)


def write_manifest(prepared_dir: str | Path, manifest: Manifest, source_sha256: str) -> Path:
    """Write ``manifest.json`` and ``source.json`` (its source part) into `prepared_dir`."""
    source = manifest.source_part(source_sha256).to_dict()
    fsio.write_json(Path(prepared_dir) / "source.json", source)
    return fsio.write_json(Path(prepared_dir) / "manifest.json", manifest.to_dict())


# ---------------------------------------------------------------------------- helpers

_TUPLES = {"source_classes", "target_classes", "input_shape", "mean", "std"}


def _required(data: Any, cls: type, where: str | Path) -> dict[str, Any]:
    """`data`'s values for `cls`'s fields; a missing field without a default is an error."""
    if not isinstance(data, dict):
        raise TlpipeError(f"{where} holds no mapping: run `tlpipe prepare` again")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = data[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TlpipeError(f"{where} lacks {f.name!r}: run `tlpipe prepare` again")
    return values


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if k in _TUPLES else v for k, v in values.items()}


def _side(data: dict[str, Any] | None) -> Side | None:
    if not data:
        return None
    values = {f.name: data[f.name] for f in dataclasses.fields(Side) if f.name in data}
    for key in ("class_ids", "classes", "names"):
        if key in values:
            values[key] = tuple(values[key])
    return Side(**values)


def _plain(record: Any) -> dict[str, Any]:
    """A record as JSON data, in field order (tuples as lists)."""
    return dataclasses.asdict(record, dict_factory=lambda items: {k: _list(v) for k, v in items})


def _list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
