"""Every tunable of tlpipe: one frozen dataclass per params.yaml section.

These dataclasses *are* the defaults. `make run`, `tlpipe <step>`, the Kubeflow pipeline's
parameter defaults and the benchmarks all start from them; params.yaml (and the presets in
scenarios/) only says what a scenario changes, and `--set section.key=value` changes one field
for one run (`tlpipe.config.resolve`). `tlpipe params` prints the resolved values.

No torch here (nor numpy): `tlpipe pipeline submit` and the KFP compiler import this module. The
registries that the names below point into (`tlpipe.matching.MATCHERS`,
`tlpipe.steps.finetune.STRATEGIES`, `tlpipe.scenario.SHIFTS`) are checked against these names
by the tests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from tlpipe.errors import TlpipeError

STRATEGY_NAMES = ("scratch", "linear_probe", "partial", "full", "lp_ft", "joint", "specialist")
MATCHER_NAMES = ("discriminator", "knn", "class", "uniform")
# shift op → the name of its one parameter (None: it takes none)
SHIFT_PARAMS: dict[str, str | None] = {
    "invert": None,
    "rotate": "degrees",
    "gaussian_blur": "sigma",
    "noise": "std",
}
# The strategies `make run` (one DVC finetune stage each) and the Kubeflow DAG (one ParallelFor
# task each) train and compare; params.yaml's top-level `strategies:` overrides it.
DEFAULT_STRATEGIES = ("linear_probe", "partial", "full", "lp_ft", "joint")


# ---------------------------------------------------------------------------- fetch, prepare


@dataclass(frozen=True)
class FetchConfig:
    """`fetch:`.

    Attributes:
        dataset: A known dataset name (fashion-mnist) or any other name for custom data.
        sources: Local paths or http(s) URLs, tried in order; empty = the known dataset's
            defaults (for fashion-mnist: the Debian package dir, then the official URL).
        sha256: Expected sha256 of a single-file custom source, as downloaded (optional).
        timeout: Seconds to wait for a server.
    """

    dataset: str = "fashion-mnist"
    sources: tuple[str, ...] = ()
    sha256: str | None = None
    timeout: float = 60.0


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
            "seed must be >= 0": self.seed >= 0,
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise TlpipeError(f"bad prepare parameters: {'; '.join(bad)}")


# ---------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every trainer (one sub-section each)."""

    epochs: int = 5
    batch_size: int = 128
    steps_per_epoch: int = 0  # 0: one pass over the training data; few-shot sets want more
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_frac: float = 0.15
    label_smoothing: float = 0.0
    augment: bool = False
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def _few_shot(**changes: Any) -> TrainConfig:
    """The fine-tune recipe: 10 steps an epoch over the few labelled images, cosine LR."""
    base = TrainConfig(epochs=30, batch_size=64, steps_per_epoch=10, lr=0.03, weight_decay=1e-4,
                       schedule="cosine", augment=True)  # fmt: skip
    return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class PretrainConfig:
    """`pretrain:`.

    Attributes:
        model: small_cnn (CPU-friendly), resnet18 or mobilenet_v3_small (`tlpipe.models`).
        pretrained: A local torchvision weights file (nothing is downloaded at run time).
        train: The optimisation settings.
    """

    model: str = "small_cnn"
    pretrained: str | None = None
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=4, batch_size=128, lr=0.1, augment=True)
    )


# ---------------------------------------------------------------------------- match


@dataclass(frozen=True)
class DiscriminatorSettings:
    """The domain classifier (L2 logistic regression, class-balanced).

    Attributes:
        C: Inverse regularisation strength; None picks it from a grid by k-fold balanced
            log-loss (the target is tiny, so regularisation matters more than anything).
        folds: Stratified folds for choosing C, the Platt calibration and held-out accuracy.
        max_fit_source: Source samples the classifier is fitted on (a class-stratified random
            subset; every source sample is still scored). Keeps fitting time flat in n.
    """

    C: float | None = None
    folds: int = 5
    max_fit_source: int = 5000

    def __post_init__(self) -> None:
        if self.C is not None and not self.C > 0:
            raise TlpipeError(f"match.discriminator.C must be > 0 (or null for CV), got {self.C}")
        if self.folds < 2:
            raise TlpipeError(f"match.discriminator.folds must be >= 2, got {self.folds}")
        if self.max_fit_source < 10:
            raise TlpipeError("match.discriminator.max_fit_source must be >= 10")


@dataclass(frozen=True)
class KnnSettings:
    """k-nearest-target cosine similarity.

    Attributes:
        k: Target neighbours averaged per source sample.
        temperature: Softmax temperature on the similarity's source z-score: w ∝ exp(z / T).
    """

    k: int = 5
    temperature: float = 0.5

    def __post_init__(self) -> None:
        if self.k < 1 or not self.temperature > 0:
            raise TlpipeError("match.knn needs k >= 1 and temperature > 0")


@dataclass(frozen=True)
class MatchConfig:
    """`match:`: which source samples look like the target domain (`tlpipe.matching`).

    Attributes:
        matcher: discriminator, knn, class or uniform (`tlpipe.matching.MATCHERS`).
        top_fraction: Share of the source, by weight, written to selected.npy.
        clip: Largest weight as a multiple of the mean (caps the influence of one sample).
        features: ``blocks`` (per-stage activation statistics) or ``backbone`` (final features).
        dims: Principal components the matchers work in.
        class_neutral: Remove the source-class directions first (see `tlpipe.matching`).
        use_target_val: Use the target_val images too (not their labels) as target samples.
        discriminator: C (null = cross-validated), folds, max_fit_source.
        knn: k, temperature.
        batch_size: Embedding batch size.
        plots: Write plots/weights_hist.png and plots/extremes.png.
        seed: Subsampling, folds and tie-breaking.
    """

    matcher: str = "discriminator"
    top_fraction: float = 0.5
    clip: float = 10.0
    features: Literal["blocks", "backbone"] = "blocks"
    dims: int = 32
    class_neutral: bool = True
    use_target_val: bool = True
    discriminator: DiscriminatorSettings = field(default_factory=DiscriminatorSettings)
    knn: KnnSettings = field(default_factory=KnnSettings)
    batch_size: int = 512
    plots: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.matcher not in MATCHER_NAMES:
            raise TlpipeError(
                f"unknown matcher {self.matcher!r}; choose one of: {', '.join(MATCHER_NAMES)}"
            )
        if not 0 < self.top_fraction <= 1:
            raise TlpipeError(f"match.top_fraction must be in (0, 1], got {self.top_fraction}")
        if not self.clip >= 1:
            raise TlpipeError(f"match.clip must be >= 1 (max weight / mean), got {self.clip}")
        if self.dims < 1 or self.batch_size < 1:
            raise TlpipeError("match.dims and match.batch_size must be >= 1")


# ---------------------------------------------------------------------------- finetune


@dataclass(frozen=True)
class JointConfig:
    """`finetune.joint:`, strategy `joint` (`tlpipe.joint`).

    Attributes:
        source_weight: λ, the source loss's weight relative to the target loss.
        sampling: selected (top_fraction, w-weighted loss) | weighted (∝ w) | all.
        source_batch_size: Source images per step (0 = the target batch size).
    """

    source_weight: float = 1.0
    sampling: Literal["selected", "weighted", "all"] = "selected"
    source_batch_size: int = 0

    def __post_init__(self) -> None:
        if self.source_weight < 0 or self.source_batch_size < 0:
            raise TlpipeError("finetune.joint: source_weight and source_batch_size must be >= 0")


@dataclass(frozen=True)
class FinetuneConfig:
    """`finetune:`; `per_strategy.<name>` overrides any field for one strategy.

    Attributes:
        strategy: What `tlpipe finetune` trains without --strategy.
        model: The scratch baseline's architecture (the others keep the source model's).
        train: Same step budget for every strategy and the scratch baseline (30 × 10 steps).
        probe: The linear-probe phase of linear_probe and lp_ft.
        backbone_lr_scale: Discriminative LR: the backbone learns this much slower (chosen on
            target validation accuracy at k = 5 and 20, never on test).
        layer_decay: And each earlier block this much slower again (1 = off).
        partial_blocks: `partial`: how many of the last backbone blocks train.
        l2sp: L2-SP strength α: penalty α/2·‖w − w_source‖² on the backbone.
        joint: Strategy `joint`: co-training on the match-weighted source.
        specialist: Strategy `specialist`: its phase on the matched source alone.
        per_strategy: Overrides per strategy, e.g. ``{scratch: {train: {lr: 0.05}}}``.
    """

    strategy: str = "lp_ft"
    model: str = "small_cnn"
    train: TrainConfig = field(default_factory=_few_shot)
    probe: TrainConfig = field(default_factory=lambda: _few_shot(epochs=10, lr=0.05))
    backbone_lr_scale: float = 0.3
    layer_decay: float = 1.0
    partial_blocks: int = 2
    l2sp: float = 0.0
    joint: JointConfig = field(default_factory=JointConfig)
    specialist: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=4, batch_size=128, lr=0.03, schedule="cosine", augment=True
        )  # fmt: skip
    )
    per_strategy: dict[str, Any] = field(
        default_factory=lambda: {"scratch": {"train": {"lr": 0.05}}}
    )

    def __post_init__(self) -> None:
        check_strategies([self.strategy, *self.per_strategy])

    def for_strategy(self, name: str) -> FinetuneConfig:
        """This config with `per_strategy[name]` applied (and `strategy` set to `name`)."""
        from tlpipe.config import build, to_dict

        merged = _merge(to_dict(self), dict(self.per_strategy.get(name) or {}))
        merged["strategy"] = name
        return build(FinetuneConfig, merged, where="finetune.")


def check_strategies(names: Any) -> None:
    """Raise a TlpipeError naming any unknown strategy."""
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if unknown:
        raise TlpipeError(f"unknown strategy {unknown[0]!r}; choose: {', '.join(STRATEGY_NAMES)}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------- evaluate … register


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate:`.

    Attributes:
        baseline: The strategy every other one is compared with.
        plots: Write the confusion-matrix PNGs.
    """

    baseline: str = "scratch"
    plots: bool = True


Calibration = Literal["minmax", "entropy", "percentile"]
CALIBRATION_SPLITS = ("target_val", "target_train", "source_val", "source")  # never target_test


@dataclass(frozen=True)
class ExportConfig:
    """`export:`.

    Attributes:
        opset: ONNX opset (≥ 18: the torch.export-based exporter's lowest).
        tolerance: Largest allowed |logit difference| between ONNX Runtime and torch.
        min_agreement: Smallest allowed share of test images with the same argmax.
        int8: Also write the statically quantized `model.int8.onnx`.
        calibration_images: How many images calibrate the INT8 activation ranges.
        calibration_splits: Prepared splits the calibration images come from, in order: all
            of the first (up to `calibration_images`), then the next, … Never the test split.
        calibration_method: ONNX Runtime calibration method.
        fp32_first_last: Keep the first Conv and the classifier (Gemm) in float in the INT8
            file: on Fashion-MNIST, 8-bit there cost 1.6 accuracy points (0.2 without), for
            under 1 % of small_cnn's weights.
        model_version: Written into the metadata; empty = the checkpoint's sha256 prefix.
        batch_size: Images per ONNX Runtime call when measuring parity and accuracy.
    """

    opset: int = 18
    tolerance: float = 1e-4
    min_agreement: float = 0.999
    int8: bool = True
    calibration_images: int = 500
    calibration_splits: tuple[str, ...] = ("target_val", "target_train")
    calibration_method: Calibration = "minmax"
    fp32_first_last: bool = True
    model_version: str = ""
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.opset < 18:
            raise ValueError(f"opset must be ≥ 18 (torch.export ONNX exporter), got {self.opset}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        if not 0 < self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be in (0, 1], got {self.min_agreement}")
        bad = set(self.calibration_splits) - set(CALIBRATION_SPLITS)
        if bad or not self.calibration_splits:
            raise ValueError(f"calibration_splits must be from {CALIBRATION_SPLITS}, got {bad}")
        if self.calibration_images < 1 or self.batch_size < 1:
            raise ValueError("calibration_images and batch_size must be ≥ 1")


@dataclass(frozen=True)
class RegisterConfig:
    """`register:`. Where the registry is comes from the environment (MLFLOW_TRACKING_URI).

    Attributes:
        model_name: The registered model.
        accuracy_floor: Never promote below this target test accuracy.
        min_improvement: Must beat the champion (same test data) by more than this (a
            fraction: 0.005 = half a point).
    """

    model_name: str = "tlpipe"
    accuracy_floor: float = 0.5
    min_improvement: float = 0.0


# params.yaml section → its config class, in pipeline order
SECTIONS: dict[str, type] = {
    "fetch": FetchConfig,
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
    "match": MatchConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "register": RegisterConfig,
}
