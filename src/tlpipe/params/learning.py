"""`pretrain:`, `match:`, `finetune:`: the training steps' settings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from tlpipe.errors import TlpipeError
from tlpipe.params.fields import above, at_least, between

STRATEGY_NAMES = ("scratch", "linear_probe", "partial", "full", "lp_ft", "joint", "specialist")
# The strategies `make run` and the Kubeflow pipeline train and compare (one DVC stage / KFP
# task each); params.yaml's top-level `strategies:` overrides it.
DEFAULT_STRATEGIES = ("linear_probe", "partial", "full", "lp_ft", "joint")
SOURCE_STRATEGIES = ("joint", "specialist")  # they train on source images, not just a backbone
MATCHER_NAMES = ("discriminator", "knn", "class", "uniform")


@dataclass(frozen=True)
class RandomResizedCrop:
    """`augment.random_resized_crop`: torchvision's RandomResizedCrop, back to the input size.

    Attributes:
        scale: Range of the crop's area as a fraction of the image (torchvision's default).
        ratio: Range of the crop's aspect ratio (width / height).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        scale, ratio = _pair(self.scale, "scale"), _pair(self.ratio, "ratio")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(
                "need 0 < scale[0] <= scale[1] <= 1 and "
                f"0 < ratio[0] <= ratio[1], got scale {list(scale)}, ratio {list(ratio)}"
            )


@dataclass(frozen=True)
class ColorJitter:
    """`augment.color_jitter`: torchvision's ColorJitter (0 = that property unchanged).

    Attributes:
        brightness: Factor drawn from [1 - b, 1 + b].
        contrast: Factor drawn from [1 - c, 1 + c].
        saturation: Factor drawn from [1 - s, 1 + s] (no effect on grey images).
        hue: Shift drawn from [-h, h], h <= 0.5 (no effect on grey images).
    """

    brightness: Annotated[float, at_least(0)] = 0.0
    contrast: Annotated[float, at_least(0)] = 0.0
    saturation: Annotated[float, at_least(0)] = 0.0
    hue: Annotated[float, between(0, 0.5)] = 0.0

    def __post_init__(self) -> None:
        values = (self.brightness, self.contrast, self.saturation, self.hue)
        if min(values) < 0 or self.hue > 0.5:
            raise ValueError(
                "brightness, contrast and saturation must be >= 0 and hue in [0, 0.5], got "
                f"{list(values)}"
            )


@dataclass(frozen=True)
class Augment:
    """`<trainer>.train.augment`: random changes to each training image, redrawn every step.

    Applied in this order: random_resized_crop → color_jitter → pad_crop → hflip, with
    `torchvision.transforms.v2` for the first two (`tlpipe.data.loader.augment`). What a batch gets
    depends only on (train.seed, epoch, step). The defaults are the recipe for small images
    (a translation by up to 2 px and a horizontal flip); for photos at 224 px the usual recipe
    is ``{random_resized_crop: {scale: [0.08, 1]}, pad_crop: 0}``. A section given in
    params.yaml fills in the fields it leaves out from these defaults. ``augment: true`` means
    these defaults, ``augment: false`` no augmentation at all.

    Attributes:
        random_resized_crop: A random crop resized back to the input size; null = off.
        color_jitter: Random brightness / contrast / saturation / hue; null = off.
        pad_crop: Random translation by up to this many pixels (zero fill); 0 = off.
        hflip: Mirror half of the images left-right.
    """

    random_resized_crop: RandomResizedCrop | None = None
    color_jitter: ColorJitter | None = None
    pad_crop: Annotated[int, at_least(0)] = 2
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.pad_crop < 0:
            raise ValueError(f"pad_crop must be >= 0 pixels, got {self.pad_crop}")

    @classmethod
    def off(cls) -> Augment:
        """No augmentation (``augment: false``)."""
        return cls(pad_crop=0, hflip=False)

    @property
    def enabled(self) -> bool:
        return bool(self.random_resized_crop or self.color_jitter or self.pad_crop or self.hflip)


def _pair(values: tuple[float, ...], name: str) -> tuple[float, float]:
    if len(values) != 2:
        raise ValueError(f"{name} must be [low, high], got {list(values)}")
    return values[0], values[1]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every trainer (one sub-section each)."""

    epochs: Annotated[int, at_least(1)] = 5
    batch_size: Annotated[int, at_least(1)] = 128
    # 0: one pass over the training data; few-shot sets want more
    steps_per_epoch: Annotated[int, at_least(0)] = 0
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, above(0)] = 0.05
    momentum: Annotated[float, between(0, 1, "[)")] = 0.9
    weight_decay: Annotated[float, at_least(0)] = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_frac: Annotated[float, between(0, 1, "[)")] = 0.15
    label_smoothing: Annotated[float, between(0, 1, "[)")] = 0.0
    augment: Augment | bool | None = None  # a section (Augment); true: its defaults; false: off
    seed: Annotated[int, at_least(0)] = 0
    device: str = "auto"
    # up to this much uint8 image data trains from the device
    max_in_memory_mb: Annotated[float, at_least(0)] = 256.0
    # readers when the data streams from disk (above the limit): DataLoader worker processes
    # on a CPU, threads reading into pinned memory on CUDA
    num_workers: Annotated[int, at_least(0)] = 2
    # Validation scored each epoch (to keep the best epoch) on at most this many images: a
    # fixed random subset (seeded by `seed`, the same every epoch); 0 = all. A large target_val
    # (thousands) otherwise costs more per epoch than the training steps.
    val_max_images: Annotated[int, at_least(0)] = 0

    def __post_init__(self) -> None:
        if not isinstance(self.augment, Augment):  # true / false (older params files), None
            object.__setattr__(self, "augment", Augment() if self.augment else Augment.off())
        if self.max_in_memory_mb < 0 or self.num_workers < 0 or self.val_max_images < 0:
            raise ValueError("max_in_memory_mb, num_workers and val_max_images must be ≥ 0")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def _few_shot(**changes: Any) -> TrainConfig:
    """The fine-tune recipe: 10 steps an epoch over the few labelled images, cosine LR."""
    base = TrainConfig(
        epochs=30,
        batch_size=64,
        steps_per_epoch=10,
        lr=0.03,
        weight_decay=1e-4,
        schedule="cosine",
        augment=True,
    )
    return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class Workers:
    """`pretrain.workers` / `finetune.workers`: where the Kubeflow DAG's training task trains.

    Attributes:
        nodes: 1 (the default): in the task's own pod. More: the task submits a Kubeflow Trainer
            TrainJob of this many nodes through the Kubeflow SDK and waits for it; the nodes
            train data-parallel (DDP, `tlpipe.train.distributed`) with the same global batch.
        procs_per_node: Processes per node (torchrun's --nproc_per_node): its GPUs.
        runtime: The TrainingRuntime the job runs on (k8s/components/trainer: ``tlpipe``).
        timeout_s: How long the task waits for the job before failing.
    """

    nodes: Annotated[int, at_least(1)] = 1
    procs_per_node: Annotated[int, at_least(1)] = 1
    runtime: str = "tlpipe"
    timeout_s: Annotated[int, at_least(1)] = 24 * 3600

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.procs_per_node < 1 or self.timeout_s < 1:
            raise ValueError("workers.nodes, procs_per_node and timeout_s must be ≥ 1")


@dataclass(frozen=True)
class PretrainConfig:
    """`pretrain:`, the source model.

    Attributes:
        model: small_cnn (CPU-friendly) or a torchvision classifier by name: resnet18/34/50/101,
            mobilenet_v2, mobilenet_v3_small/large, efficientnet_b0-b3, convnext_tiny/small
            (`tlpipe.train.models.MODELS`).
        pretrained: Starting weights for `model`: ``imagenet`` (torchvision's default weights
            for it) or a torchvision weights name such as ``IMAGENET1K_V2``, read from the torch
            hub cache ($TORCH_HOME/hub/checkpoints, downloaded there if missing and online); or
            a local file: a torchvision state_dict or a tlpipe checkpoint. The checkpoint's
            normalisation becomes the weights' own (ImageNet mean/std for torchvision weights).
            Required when the scenario has no source dataset (`fetch.source: null`): pretrain
            then trains nothing and writes the backbone as the source model.
        train: The optimisation settings.
        workers: Where the Kubeflow DAG trains it (one pod, or a TrainJob of several nodes).
    """

    model: str = "small_cnn"
    pretrained: str | None = None
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=4, batch_size=128, lr=0.1, augment=True)
    )
    workers: Workers = field(default_factory=Workers)


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
        refine: Most rounds of domain-axis refinement (`tlpipe.match.ratio.refine_axis`): the
            discriminator's direction is re-fitted *within the source*, on the source's own
            split along it, until the split stops moving; then calibrated against the target
            along that axis. 0 = the plain target-vs-source discriminator.
    """

    C: Annotated[float, above(0)] | None = None
    folds: Annotated[int, at_least(2)] = 5
    max_fit_source: Annotated[int, at_least(10)] = 5000
    refine: Annotated[int, at_least(0)] = 30

    def __post_init__(self) -> None:
        if self.C is not None and not self.C > 0:
            raise TlpipeError(f"match.discriminator.C must be > 0 (or null for CV), got {self.C}")
        if self.folds < 2:
            raise TlpipeError(f"match.discriminator.folds must be >= 2, got {self.folds}")
        if self.max_fit_source < 10:
            raise TlpipeError("match.discriminator.max_fit_source must be >= 10")
        if self.refine < 0:
            raise TlpipeError(f"match.discriminator.refine must be >= 0, got {self.refine}")


@dataclass(frozen=True)
class KnnSettings:
    """k-nearest-target cosine similarity.

    Attributes:
        k: Target neighbours averaged per source sample.
        temperature: Softmax temperature on the similarity's source z-score: w ∝ exp(z / T).
    """

    k: Annotated[int, at_least(1)] = 5
    temperature: Annotated[float, above(0)] = 0.5

    def __post_init__(self) -> None:
        if self.k < 1 or not self.temperature > 0:
            raise TlpipeError("match.knn needs k >= 1 and temperature > 0")


@dataclass(frozen=True)
class MatchConfig:
    """`match:`: which source samples look like the target domain (`tlpipe.match.matchers`).

    Attributes:
        matcher: discriminator, knn, class or uniform (`tlpipe.match.matchers.MATCHERS`).
        top_fraction: Share of the source, by weight, written to selected.npy.
        clip: Largest weight as a multiple of the mean (caps the influence of one sample).
        features: ``blocks`` (per-stage activation statistics) or ``backbone`` (final features).
        dims: Principal components the matchers work in.
        class_neutral: Remove the source-class directions first (see `tlpipe.match.matchers`).
        use_target_val: Use the target_val images too (not their labels) as target samples.
        discriminator: C (null = cross-validated), folds, max_fit_source.
        knn: k, temperature.
        batch_size: Embedding batch size.
        plots: Write plots/weights_hist.png and plots/extremes.png.
        seed: Subsampling, folds and tie-breaking.
    """

    matcher: str = "discriminator"
    top_fraction: Annotated[float, between(0, 1, "(]")] = 0.5
    clip: Annotated[float, at_least(1)] = 10.0
    features: Literal["blocks", "backbone"] = "blocks"
    dims: Annotated[int, at_least(1)] = 32
    class_neutral: bool = True
    use_target_val: bool = True
    discriminator: DiscriminatorSettings = field(default_factory=DiscriminatorSettings)
    knn: KnnSettings = field(default_factory=KnnSettings)
    batch_size: Annotated[int, at_least(1)] = 512
    plots: bool = True
    seed: Annotated[int, at_least(0)] = 0

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
    """`finetune.joint:`, strategy `joint` (`tlpipe.train.joint`).

    Attributes:
        source_weight: λ, the source loss's weight relative to the target loss.
        sampling: selected (top_fraction, w-weighted loss) | weighted (∝ w) | all.
        source_batch_size: Source images per step (0 = the target batch size).
    """

    source_weight: Annotated[float, at_least(0)] = 1.0
    sampling: Literal["selected", "weighted", "all"] = "selected"
    source_batch_size: Annotated[int, at_least(0)] = 0

    def __post_init__(self) -> None:
        if self.source_weight < 0 or self.source_batch_size < 0:
            raise TlpipeError("finetune.joint: source_weight and source_batch_size must be >= 0")


@dataclass(frozen=True)
class SelectionConfig:
    """`finetune.selection:`: choosing the model to ship when target validation is small.

    With fewer than `min_val` validation images, every model (scratch included) is also scored
    by stratified k-fold cross-validation over the labelled target, target_train +
    target_val (never test): fold by fold, the strategy trains on the other folds for
    `epoch_fraction` of its epochs and predicts the held-out one. `evaluate` then selects on
    these out-of-fold predictions (k × more images than validation alone) and pairs them image
    by image against scratch for an interval. It costs `folds` × `repeats` extra fits per
    model.

    Attributes:
        min_val: Cross-validate when target_val has fewer images than this; 0 = never.
        folds: k (≥ 2). 5 by default: each fit then trains on 4/5 of the labelled images,
            close to what the refit model learns from. With 3 folds (2/3) CV under-rated
            scratch, which gains more from the last images than a transferred model, by about
            4 points on 50 images; 5 folds was registered in advance against 3 and shipped
            better (benchmarks/README.md, "Five folds instead of three"), for 1.5x the
            fine-tuning time.
        repeats: Repeated k-fold: each repeat draws new folds (seed + r) and trains with new
            seeds (train/probe seed + r); an image's score is its share of correct out-of-fold
            predictions. More repeats remove training and fold noise from the comparison (not
            the noise of having few images); 1 = plain k-fold.
        epoch_fraction: Share of each phase's epochs a CV fit trains (at least one epoch).
            1 (the default): every CV fit gets the strategy's own budget. Shorter fits were
            measured to mis-rank (benchmarks/README.md, "Selection regret"): a linear probe
            converges in a few epochs, scratch does not, so short CV favours the probe.
        seed: Fold assignment; the same for every strategy, so comparisons are paired.
        refit: When cross-validating, train the model that ships on every labelled image
            (target_train + target_val) for the full epochs and keep the last epoch, as each
            CV fit does: CV then estimates the recipe the shipped model follows, on the same
            kind of data, and the model learns from all of it (few-shot: twice the images).
            Its validation metrics are then not held out, and evaluate shows none. False: the
            shipped model trains on target_train and picks its epoch on target_val.
    """

    min_val: Annotated[int, at_least(0)] = 100
    folds: Annotated[int, at_least(2)] = 5
    repeats: Annotated[int, at_least(1)] = 1
    epoch_fraction: Annotated[float, between(0, 1, "(]")] = 1.0
    seed: Annotated[int, at_least(0)] = 0
    refit: bool = True

    def __post_init__(self) -> None:
        if (
            self.min_val < 0
            or self.folds < 2
            or self.repeats < 1
            or not 0 < self.epoch_fraction <= 1
        ):
            raise TlpipeError(
                "finetune.selection: min_val must be >= 0, folds >= 2, repeats >= 1, "
                "epoch_fraction in (0, 1]"
            )


@dataclass(frozen=True)
class FinetuneConfig:
    """`finetune:`; `per_strategy.<name>` overrides any field for one strategy.

    Attributes:
        strategy: What `tlpipe finetune` trains without --strategy.
        model: The scratch baseline's architecture. null (the default) = the transfer models'
            own, `pretrain.model`, so that scratch is the same network with random weights
            (like for like); set it only to compare against another architecture on purpose.
        train: Same step budget for every strategy and the scratch baseline (30 × 10 steps).
        probe_solver: How the linear probe (`linear_probe`, the first phase of `lp_ft`) trains
            the new head. ``lbfgs`` (default): L2 logistic regression on the backbone's fixed
            features of the un-augmented training images, centred and scaled to a mean
            squared norm of 1, solved to convergence with L-BFGS and folded into the head
            (`tlpipe.train.probe`); the features are held in memory (N × feature width,
            float64). ``sgd``: the training loop with `probe`'s epochs, augmentation and LR
            (streams data of any size); it was the only solver before, and left weak
            backbones' heads near chance (benchmarks/README.md, "The linear probe, solved").
            `lp_ft` keeps ``sgd`` by default (`per_strategy`): its probe is a warm start for
            fine-tuning, and the solved head, already fitting the few training images, left
            lp_ft 0.6 points lower on validation across the benchmark's zoo.
        probe_l2: ``lbfgs``: the L2 strength on the head's weights, scikit-learn's 1 / C: the
            loss is the mean cross-entropy + probe_l2 / (2N) · ‖W‖² over the N training
            images' scaled features. ``auto`` (default): chosen from 0.01 … 1000 by stratified
            5-fold CV on the same training images (held-out log-likelihood); 30 small solves,
            about a second at few-shot sizes.
        probe: ``sgd``: the probe phase's training budget.
        backbone_lr_scale: Discriminative LR: the backbone learns this much slower (chosen on
            target validation accuracy at k = 5 and 20, never on test).
        layer_decay: And each earlier block this much slower again (1 = off).
        partial_blocks: `partial`: how many of the last backbone blocks train.
        l2sp: L2-SP strength α: penalty α/2·‖w − w_source‖² on the backbone.
        joint: Strategy `joint`: co-training on the match-weighted source.
        specialist: Strategy `specialist`: its phase on the matched source alone.
        selection: Cross-validated selection when validation is small (`SelectionConfig`).
        skip: ``never`` (default) or ``logme``: skip a transfer strategy (write it untrained,
            marked skipped; evaluate never ships it) when the LogME score of the source
            features on the labelled target is no higher than that of the same network at
            random init (`tlpipe.steps.finetune.transferability`). Opt-in: it saves the
            strategy's whole training budget when pretraining evidently does not transfer.
        per_strategy: Overrides per strategy, e.g. ``{scratch: {train: {lr: 0.05}}}``; yours are
            laid over these defaults (scratch's lr, lp_ft's SGD probe), entry by entry.
        workers: Where the Kubeflow DAG trains each strategy (`Workers`).
    """

    strategy: str = "lp_ft"
    model: str | None = None
    train: TrainConfig = field(default_factory=_few_shot)
    probe_solver: Literal["lbfgs", "sgd"] = "lbfgs"
    probe_l2: Annotated[float, above(0)] | Literal["auto"] = "auto"
    probe: TrainConfig = field(default_factory=lambda: _few_shot(epochs=10, lr=0.05))
    backbone_lr_scale: Annotated[float, at_least(0)] = 0.3
    layer_decay: Annotated[float, between(0, 1, "(]")] = 1.0
    partial_blocks: Annotated[int, at_least(0)] = 2
    l2sp: Annotated[float, at_least(0)] = 0.0
    joint: JointConfig = field(default_factory=JointConfig)
    specialist: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=4, batch_size=128, lr=0.03, schedule="cosine", augment=True
        )
    )
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    skip: Literal["never", "logme"] = "never"
    per_strategy: dict[str, Any] = field(
        default_factory=lambda: {
            "scratch": {"train": {"lr": 0.05}},
            "lp_ft": {"probe_solver": "sgd"},  # see probe_solver
        }
    )
    workers: Workers = field(default_factory=Workers)

    def __post_init__(self) -> None:
        check_strategies([self.strategy, *self.per_strategy])

    def for_strategy(self, name: str) -> FinetuneConfig:
        """This config with `per_strategy[name]` applied (and `strategy` set to `name`)."""
        from tlpipe.params.fields import build, merge, to_dict

        merged = merge(to_dict(self), dict(self.per_strategy.get(name) or {}))
        merged["strategy"] = name
        return build(FinetuneConfig, merged, where="finetune.")


def check_strategies(names: Any, baseline: str | None = None) -> None:
    """Raise a TlpipeError naming any unknown strategy.

    Args:
        baseline: For the list of strategies to train and compare (`strategies:`): it must
            be unique and leave out `evaluate.baseline`, which is trained and compared anyway.
    """
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if unknown:
        raise TlpipeError(f"unknown strategy {unknown[0]!r}; choose: {', '.join(STRATEGY_NAMES)}")
    if baseline is not None and (len(set(names)) != len(names) or baseline in names):
        raise TlpipeError(
            f"strategies must be unique and leave out evaluate.baseline ({baseline!r}, trained "
            f"and compared anyway), got {list(names)}"
        )


def check_source_strategies(names: Any, has_source: bool) -> None:
    """Raise a TlpipeError if a strategy that trains on source images has no source dataset."""
    need = [n for n in names if n in SOURCE_STRATEGIES]
    if need and not has_source:
        usable = [n for n in STRATEGY_NAMES if n not in SOURCE_STRATEGIES]
        raise TlpipeError(
            f"strategy {need[0]!r} needs a source dataset, but this scenario has none "
            f"(fetch.source: null); use one of: {', '.join(usable)}"
        )
