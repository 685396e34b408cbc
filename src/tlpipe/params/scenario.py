"""`fetch:` and `prepare:` (the scenario): where the data comes from and how it is split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tlpipe.errors import TlpipeError

# shift op → the name of its one parameter (None: it takes none); functions: tlpipe.scenario
SHIFT_PARAMS: dict[str, str | None] = {
    "invert": None,
    "rotate": "degrees",
    "gaussian_blur": "sigma",
    "noise": "std",
}


@dataclass(frozen=True)
class FetchConfig:
    """`fetch:`.

    Attributes:
        dataset: A known dataset name (fashion-mnist) or any other name for custom data.
        sources: Local paths or http(s) URLs, tried in order; empty = the known dataset's
            defaults (for fashion-mnist: the Debian package dir, then the official URL).
        sha256: Expected sha256 of a single-file custom source, as downloaded (optional).
            Without it, a download that has no Content-Length must be a format whose
            completeness can be checked (zip, npz, gzip, tar).
        timeout: Seconds to wait for a server on each read (connect, headers, each block).
        deadline: Seconds one download may take from request to last byte. A server that
            trickles bytes never trips `timeout`; the default, an hour, fetches a few GB on
            a slow link yet keeps a scheduled run from hanging for ever.
    """

    dataset: str = "fashion-mnist"
    sources: tuple[str, ...] = ()
    sha256: str | None = None
    timeout: float = 60.0
    deadline: float = 3600.0

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and self.deadline > 0):
            raise TlpipeError("bad fetch parameters: timeout and deadline must be > 0 seconds")


@dataclass(frozen=True)
class ShiftOp:
    """One shift operation, e.g. ``{op: rotate, degrees: 30}`` in params.yaml.

    Attributes:
        op: One of invert, rotate, gaussian_blur, noise (`tlpipe.scenario.SHIFTS`).
        degrees: Counter-clockwise rotation (rotate only).
        sigma: Blur standard deviation in pixels, > 0 (gaussian_blur only).
        std: Noise standard deviation on the 0–1 intensity scale, >= 0 (noise only).
    """

    op: str
    degrees: float | None = None
    sigma: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.op not in SHIFT_PARAMS:
            raise TlpipeError(f"unknown shift op {self.op!r}; known: {', '.join(SHIFT_PARAMS)}")
        wanted = SHIFT_PARAMS[self.op]
        for name in ("degrees", "sigma", "std"):
            given = getattr(self, name) is not None
            if name == wanted and not given:
                raise TlpipeError(f"shift op {self.op} needs {name}")
            if name != wanted and given:
                raise TlpipeError(f"shift op {self.op} takes no {name}")
        if (self.sigma is not None and self.sigma <= 0) or (self.std is not None and self.std < 0):
            raise TlpipeError(f"shift op {self.op}: sigma must be > 0 and std >= 0")

    @property
    def value(self) -> float:
        """The op's parameter (0.0 for invert)."""
        name = SHIFT_PARAMS[self.op]
        return float(getattr(self, name)) if name else 0.0


@dataclass(frozen=True)
class PrepareConfig:
    """`prepare:`, the scenario.

    Attributes:
        dataset: Dataset name, recorded in the manifest; a known one (`tlpipe.data.DATASETS`)
            names its classes.
        format: Raw layout: idx, imagefolder (train/, test/ of class folders) or npz.
        source_classes: Dataset class ids of the source task.
        target_classes: Dataset class ids of the target task (may overlap the source ones; an
            image is then never in both).
        k: Labelled target images per class, sampled from the official train set.
        val_per_class: Target validation images per class, from the train set, disjoint from k.
        source_val_fraction: Fraction of each source class held out as source validation.
        max_source_per_class: Cap on source images per class (None = all); 3000 keeps
            `make run` within minutes on a 2-core CPU.
        max_test_per_class: Cap on test images per target class (None = all).
        shift: Target-domain shift, ops applied in order, e.g. ``[{op: invert}]``.
        source_shift_fraction: Fraction of source images (random, seeded) also shifted.
        channels: Output channels, 1 or 3 (None = as stored; imagefolder: 3).
        input_size: Output side length in pixels (None = as stored; imagefolder needs it).
        max_image_pixels: Larger images (width x height, read from the file's header) are
            refused before decoding: a 500 KB PNG can declare 13 300² pixels and take ~1 GB to
            decode. 50 MP passes full-size photos of 48 MP phones and 45 MP cameras while one
            decoded RGB image stays under 150 MB; raise it per dataset if yours are larger.
        seed: Seed of every random choice.
    """

    dataset: str = "fashion-mnist"
    format: Literal["idx", "imagefolder", "npz"] = "idx"
    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat
    target_classes: tuple[int, ...] = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot
    k: int = 5
    val_per_class: int = 5
    source_val_fraction: float = 0.05
    max_source_per_class: int | None = 3000
    max_test_per_class: int | None = None
    shift: tuple[ShiftOp, ...] = ()
    source_shift_fraction: float = 0.0
    channels: int | None = None
    input_size: int | None = None
    max_image_pixels: int = 50_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "k must be >= 1": self.k >= 1,
            "val_per_class must be >= 1": self.val_per_class >= 1,
            "source_val_fraction must be in [0, 1)": 0 <= self.source_val_fraction < 1,
            "source_shift_fraction must be in [0, 1]": 0 <= self.source_shift_fraction <= 1,
            "max_source_per_class must be >= 1": (self.max_source_per_class or 1) >= 1,
            "max_test_per_class must be >= 1": (self.max_test_per_class or 1) >= 1,
            "channels must be 1 or 3": self.channels in (None, 1, 3),
            "input_size must be >= 8": (self.input_size or 8) >= 8,
            "max_image_pixels must be >= 1": self.max_image_pixels >= 1,
            "seed must be >= 0": self.seed >= 0,
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise TlpipeError(f"bad prepare parameters: {'; '.join(bad)}")


CHECK_FINDINGS = ("vanished_class", "label_set_changed", "input_shape_changed",
                  "duplicates_across_splits")  # fmt: skip


@dataclass(frozen=True)
class CheckConfig:
    """`check:`, this run's data against the champion's, before training (`tlpipe.steps.check`).

    Attributes:
        fail_on: The findings that stop the run (the others are only reported): any of
            vanished_class, label_set_changed, input_shape_changed, duplicates_across_splits.
    """

    fail_on: tuple[str, ...] = ("vanished_class", "label_set_changed", "input_shape_changed")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fail_on) - set(CHECK_FINDINGS))
        if unknown:
            raise TlpipeError(f"check.fail_on: unknown {unknown}; known: {list(CHECK_FINDINGS)}")
