"""`fetch:` and `prepare:` (the scenario): where the data comes from and how it is split."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

from tlpipe.errors import TlpipeError
from tlpipe.params.fields import above, at_least, between

# shift op → the name of its one parameter (None: it takes none); functions: tlpipe.data.splitting
SHIFT_PARAMS: dict[str, str | None] = {
    "invert": None,
    "rotate": "degrees",
    "gaussian_blur": "sigma",
    "noise": "std",
    "contrast": "factor",
}


DATA_FORMATS = ("idx", "imagefolder", "npz", "manifest")  # readers: tlpipe.data.readers.READERS


@dataclass(frozen=True)
class DataSpec:
    """One side's data (`fetch.source`, `fetch.target`): what it is and where it lives.

    Attributes:
        dataset: A known dataset name (fashion-mnist: its format, files, checksums and class
            names are built in) or any other name for your own data.
        format: How the data is laid out: idx (MNIST-style files), imagefolder (class folders,
            under train/ and test/ when the data has its own test set), npz (train.npz, test.npz),
            or manifest (a ``manifest.csv`` or ``manifest.parquet`` with columns path, label and
            optionally split = train/test; paths relative to the manifest). None = the known
            dataset's format.
        sources: Where to get it, tried in order: local paths, http(s) URLs, ``s3://bucket/prefix``
            (S3 or MinIO through boto3; credentials and ``AWS_ENDPOINT_URL`` from the
            environment). A folder, an archive, one file, or a local manifest file (then only the
            images it lists are copied). Empty = the known dataset's own places.
        sha256: Expected sha256 of a single-file source, as downloaded (optional). Without it, a
            download that has no Content-Length must be a format whose completeness can be
            checked (zip, npz, gzip, tar).
    """

    dataset: str = "fashion-mnist"
    format: Literal["idx", "imagefolder", "npz", "manifest"] | None = None
    sources: tuple[str, ...] = ()
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.dataset.strip():
            raise TlpipeError("fetch: a dataset needs a name (any name for your own data)")


@dataclass(frozen=True)
class FetchConfig:
    """`fetch:`, the two datasets of the scenario.

    Attributes:
        source: The large labelled dataset the model learns first; None (``source: null``) = no
            source dataset, only a pretrained backbone (`pretrain.pretrained`): pretrain and
            match then have nothing to do, and joint / specialist cannot run.
        target: Your own labelled data. The same spec as `source` (the default) means one
            dataset split by class (`prepare.source.classes` vs `prepare.target.classes`), our
            benchmark: fetched once, and no image is ever in both.
        timeout: Seconds to wait for a server on each read (connect, headers, each block).
        deadline: Seconds one download may take from request to last byte. A server that
            trickles bytes never trips `timeout`; the default, an hour, fetches a few GB on
            a slow link yet keeps a scheduled run from hanging for ever.
        max_unpack_bytes: An archive (zip, tar, tar.gz/bz2/xz) may unpack to at most this
            many bytes in all (default 20 GB): unpacking stops, and fetch fails, at the first
            byte over it.
        max_unpack_ratio: ...and to at most this many times its own size: real image data
            hardly compresses (2-5x for MNIST-style arrays), a zip bomb does 1000x.
    """

    source: DataSpec | None = field(default_factory=DataSpec)
    target: DataSpec = field(default_factory=DataSpec)
    timeout: Annotated[float, above(0)] = 60.0
    deadline: Annotated[float, above(0)] = 3600.0
    max_unpack_bytes: Annotated[int, at_least(1)] = 20_000_000_000
    max_unpack_ratio: Annotated[float, at_least(1)] = 200.0

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and self.deadline > 0):
            raise TlpipeError("bad fetch parameters: timeout and deadline must be > 0 seconds")

    @property
    def one_dataset(self) -> bool:
        """True when source and target are the same dataset (a class split of it)."""
        return self.source == self.target


@dataclass(frozen=True)
class ShiftOp:
    """One shift operation, e.g. ``{op: rotate, degrees: 30}`` in params.yaml.

    Attributes:
        op: One of invert, rotate, gaussian_blur, noise, contrast
            (`tlpipe.data.splitting.SHIFTS`).
        degrees: Counter-clockwise rotation (rotate only).
        sigma: Blur standard deviation in pixels, > 0 (gaussian_blur only).
        std: Noise standard deviation on the 0–1 intensity scale, >= 0 (noise only).
        factor: Each image's deviation from its own mean intensity times `factor`, >= 0
            (contrast only): 0.4 washes it out, 1.5 sharpens it.
    """

    op: str
    degrees: float | None = None
    sigma: Annotated[float, above(0)] | None = None
    std: Annotated[float, at_least(0)] | None = None
    factor: Annotated[float, at_least(0)] | None = None

    def __post_init__(self) -> None:
        if self.op not in SHIFT_PARAMS:
            raise TlpipeError(f"unknown shift op {self.op!r}; known: {', '.join(SHIFT_PARAMS)}")
        wanted = SHIFT_PARAMS[self.op]
        for name in ("degrees", "sigma", "std", "factor"):
            given = getattr(self, name) is not None
            if name == wanted and not given:
                raise TlpipeError(f"shift op {self.op} needs {name}")
            if name != wanted and given:
                raise TlpipeError(f"shift op {self.op} takes no {name}")
        if (self.sigma is not None and self.sigma <= 0) or (self.std is not None and self.std < 0):
            raise TlpipeError(f"shift op {self.op}: sigma must be > 0 and std >= 0")
        if self.factor is not None and not (self.factor >= 0 and math.isfinite(self.factor)):
            raise TlpipeError(f"shift op {self.op}: factor must be a finite number >= 0")

    @property
    def value(self) -> float:
        """The op's parameter (0.0 for invert)."""
        name = SHIFT_PARAMS[self.op]
        return float(getattr(self, name)) if name else 0.0


ClassList = tuple[int | str, ...]


@dataclass(frozen=True)
class SourceSplit:
    """`prepare.source`: which source classes, and how many images of each.

    Attributes:
        classes: The dataset's class ids (ints) or names (strings); empty = every class.
        names: Display names for `classes`, in the same order (empty = the dataset's names).
        max_per_class: Cap on source images per class (None = all); 3000 keeps `make run`
            within minutes on a 2-core CPU.
        val_fraction: Fraction of each source class held out as source validation.
    """

    classes: ClassList = (
        0,
        1,
        2,
        3,
        4,
    )  # Fashion-MNIST: T-shirt/top, Trouser, Pullover, Dress, Coat
    names: tuple[str, ...] = ()
    max_per_class: Annotated[int, at_least(1)] | None = 3000
    val_fraction: Annotated[float, between(0, 1, "[)")] = 0.05


@dataclass(frozen=True)
class TargetSplit:
    """`prepare.target`: which target classes, and how their images are split.

    Every image goes to train, val or test by a hash of its content and `prepare.seed`, so
    adding images never moves an existing one, and the previous test set stays inside the new
    one (except in a class too small for its hashes to reach val or test: one image is
    promoted there until the class has its own; `tlpipe.data.splitting.class_masks`).
    The dataset's own test set (a test/ folder, test.npz, the IDX t10k files, a manifest's
    split column) is the test split when it has one; otherwise `test_fraction` of each class.

    Attributes:
        classes: The dataset's class ids (ints) or names (strings); empty = every class.
        names: Display names for `classes`, in the same order (empty = the dataset's names).
        k: Cap on labelled training images per class, for few-shot benchmarks; None = every
            image. "auto" (the default) = 5 on the one-dataset benchmark (the default scenario),
            every image when the target is a dataset of its own.
        val_per_class: Cap on validation images per class; None = all that fall in val. "auto"
            = 5 on the one-dataset benchmark, else None.
        val_fraction: Share of the (non-test) images that go to validation.
        test_fraction: Share that goes to test when the dataset has no test set of its own.
        max_test_per_class: Cap on test images per class (None = all).
    """

    classes: ClassList = (5, 6, 7, 8, 9)  # Fashion-MNIST: Sandal, Shirt, Sneaker, Bag, Ankle boot
    names: tuple[str, ...] = ()
    k: Annotated[int, at_least(1)] | Literal["auto"] | None = "auto"
    val_per_class: Annotated[int, at_least(1)] | Literal["auto"] | None = "auto"
    val_fraction: Annotated[float, between(0, 1, "()")] = 0.1
    test_fraction: Annotated[float, between(0, 1, "()")] = 0.2
    max_test_per_class: Annotated[int, at_least(1)] | None = None


@dataclass(frozen=True)
class PrepareConfig:
    """`prepare:`, the scenario: which classes of each side, the splits, the image format.

    Attributes:
        source: Source classes and caps (ignored when `fetch.source` is null).
        target: Target classes and how they are split.
        shift: Target-domain shift, ops applied in order, e.g. ``[{op: invert}]``.
        source_shift_fraction: Fraction of source images (random, seeded) also shifted.
        channels: Output channels, 1 or 3 (None = as stored; imagefolder and manifest: 3).
        input_size: Output side length in pixels (None = as stored; needed for image files).
        max_image_pixels: Larger images (width x height, read from the file's header) are
            refused before decoding: a 500 KB PNG can declare 13 300² pixels and take ~1 GB to
            decode. 50 MP passes full-size photos of 48 MP phones and 45 MP cameras while one
            decoded RGB image stays under 150 MB; raise it if yours are larger.
        max_image_bytes: Larger image files are refused before they are read (default 200 MB:
            a 50 MP PNG fits).
        max_unpack_ratio: A gzipped IDX file or an npz member may inflate to at most this many
            times its compressed size, checked from its header before anything is inflated.
        seed: Seed of every random choice, and of the split hash.
    """

    source: SourceSplit = field(default_factory=SourceSplit)
    target: TargetSplit = field(default_factory=TargetSplit)
    shift: tuple[ShiftOp, ...] = ()
    source_shift_fraction: Annotated[float, between(0, 1)] = 0.0
    channels: Annotated[int, between(1, 3)] | None = None
    input_size: Annotated[int, at_least(8)] | None = None
    max_image_pixels: Annotated[int, at_least(1)] = 50_000_000
    max_image_bytes: Annotated[int, at_least(1)] = 200_000_000
    max_unpack_ratio: Annotated[float, at_least(1)] = 200.0
    seed: Annotated[int, at_least(0)] = 0

    def __post_init__(self) -> None:
        src, tgt = self.source, self.target
        checks = {
            "target.k must be >= 1": tgt.k in (None, "auto") or tgt.k >= 1,
            "target.val_per_class must be >= 1": tgt.val_per_class in (None, "auto")
            or tgt.val_per_class >= 1,
            "target.max_test_per_class must be >= 1": (tgt.max_test_per_class or 1) >= 1,
            "target.val_fraction must be in (0, 1)": 0 < tgt.val_fraction < 1,
            "target.test_fraction must be in (0, 1)": 0 < tgt.test_fraction < 1,
            "target.val_fraction + test_fraction must be < 1": tgt.val_fraction + tgt.test_fraction
            < 1,
            "source.val_fraction must be in [0, 1)": 0 <= src.val_fraction < 1,
            "source.max_per_class must be >= 1": (src.max_per_class or 1) >= 1,
            "source_shift_fraction must be in [0, 1]": 0 <= self.source_shift_fraction <= 1,
            "channels must be 1 or 3": self.channels in (None, 1, 3),
            "input_size must be >= 8": (self.input_size or 8) >= 8,
            "max_image_pixels must be >= 1": self.max_image_pixels >= 1,
            "seed must be >= 0": self.seed >= 0,
        }
        for side, part in (("source", src), ("target", tgt)):
            checks[f"{side}.names must match {side}.classes one to one"] = not (
                part.names and part.classes and len(part.names) != len(part.classes)
            )
            checks[f"{side}.classes lists a class twice"] = len(set(part.classes)) == len(
                part.classes
            )
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise TlpipeError(f"bad prepare parameters: {'; '.join(bad)}")


BENCHMARK_SHOTS = 5  # what k and val_per_class "auto" mean on the one-dataset benchmark


def caps(target: TargetSplit, one_dataset: bool) -> tuple[int | None, int | None]:
    """`target.k` and `target.val_per_class` with "auto" resolved (see `TargetSplit`)."""
    auto = BENCHMARK_SHOTS if one_dataset else None
    return tuple(auto if v == "auto" else v for v in (target.k, target.val_per_class))  # type: ignore[return-value]


CHECK_FINDINGS = (
    "vanished_class",
    "label_set_changed",
    "input_shape_changed",
    "image_size_changed",
    "duplicates_across_splits",
    "few_images",
)


@dataclass(frozen=True)
class CheckConfig:
    """`check:`, this run's data against the champion's, before training (`tlpipe.steps.check`).

    Attributes:
        fail_on: The findings that stop the run (the others are only reported): any of
            vanished_class, label_set_changed, input_shape_changed, image_size_changed,
            duplicates_across_splits.
        min_images_per_class: A target class with fewer images than this in any split is
            named in the report (``few_images``), and fails the run if that is in `fail_on`.
    """

    fail_on: tuple[str, ...] = ("vanished_class", "label_set_changed", "input_shape_changed")
    min_images_per_class: Annotated[int, at_least(0)] = 5

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fail_on) - set(CHECK_FINDINGS))
        if unknown:
            raise TlpipeError(f"check.fail_on: unknown {unknown}; known: {list(CHECK_FINDINGS)}")
