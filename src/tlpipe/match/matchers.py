"""Sample matching: how target-like is each source sample? (numpy only: no torch, no sklearn).

A *matcher* is fitted on source and target embeddings and then scores any embedding with an
importance weight w(x) ≈ p_target(x) / p_source(x), normalised to mean 1 over the source it was
fitted on and clipped at `clip` × the mean. It is inductive: `score` works on new samples.

Every matcher sees the embeddings through the same `tlpipe.match.ratio.Features` map: standardise
(source mean and std), L2-normalise, remove the directions that separate the *source classes*
from each other (`class_neutral`; see below), then keep the top `dims` principal components of
the source (directions along which the source itself varies, as a mixed domain does).

Why class-neutral: source and target usually hold *different classes*, so a source-vs-target
discriminator happily learns "looks like a sandal" instead of "is inverted like the target".
Its scores then move with the source class (all T-shirts above all trousers) and swamp the
domain signal. Projecting out the span of the source class means gives every source class the
same mean linear score; what is left is the within-class variation, where the domain shift
lives. The `class` matcher wants exactly the class signal, so it fits without the projection.
What the projection cannot remove is content the target has and no source class has: the
discriminator then also ranks source samples by noise along that direction. Its refinement
(see `DiscriminatorMatcher`) moves the direction onto the source's own domain axis; `knn` is
less sensitive to it too (tests/test_matching.py, benchmarks/matching.py).

Registry `MATCHERS`: ``discriminator`` (default), ``knn``, ``class``, ``uniform``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tlpipe.data.prepared import stratified_folds
from tlpipe.errors import TlpipeError
from tlpipe.match import ratio
from tlpipe.params import DiscriminatorSettings, KnnSettings


class MatcherParams(Protocol):
    """What a matcher builder reads (`tlpipe.steps.match.MatchConfig` has it all)."""

    clip: float
    dims: int
    class_neutral: bool
    seed: int
    discriminator: DiscriminatorSettings
    knn: KnnSettings


@dataclass(frozen=True)
class Params:
    """A stand-alone `MatcherParams` (tests, benchmarks, notebooks)."""

    clip: float = 10.0
    dims: int = 32
    class_neutral: bool = True
    seed: int = 0
    discriminator: DiscriminatorSettings = field(default_factory=DiscriminatorSettings)
    knn: KnnSettings = field(default_factory=KnnSettings)


class Matcher(Protocol):
    """Fitted on source + target embeddings; scores any embedding (mean 1 over the source)."""

    diagnostics: dict[str, float]  # after fit: discriminator accuracy etc. (may be empty)
    weights: np.ndarray  # after fit: the fitted source's weights, float32, mean 1

    def fit(self, source: np.ndarray, target: np.ndarray, source_y: np.ndarray | None = None):
        """Fit; returns self."""

    def score(self, emb: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """Importance weights (float32, positive) on the scale of the fitted source's."""


# ---------------------------------------------------------------------------- inputs


def check_embeddings(
    source: np.ndarray, target: np.ndarray, source_y: np.ndarray | None = None
) -> None:
    """Raise a TlpipeError naming the problem if the embeddings cannot be matched."""
    for name, a in (("source", source), ("target", target)):
        if a.ndim != 2:
            raise TlpipeError(f"{name} embeddings must be 2-d (n, dim), got shape {a.shape}")
        if len(a) == 0:
            raise TlpipeError(f"no {name} embeddings: the {name} split is empty")
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a).all(axis=1)).sum())
            raise TlpipeError(
                f"{bad} {name} embedding(s) contain NaN/inf: the model is broken or diverged; "
                "re-run pretrain"
            )
    if source.shape[1] != target.shape[1]:
        raise TlpipeError(
            f"embedding sizes differ: source {source.shape[1]}, target {target.shape[1]}; "
            "embed both with the same model"
        )
    if source_y is not None and len(source_y) != len(source):
        raise TlpipeError(f"{len(source_y)} source labels for {len(source)} source embeddings")


def fit_weights(
    matcher: Matcher, source: np.ndarray, target: np.ndarray, source_y: np.ndarray | None = None
) -> np.ndarray:
    """Fit `matcher`; the source weights: float32, positive, finite, mean 1."""
    return matcher.fit(source, target, source_y).weights


# ---------------------------------------------------------------------------- matchers


class DiscriminatorMatcher:
    """Domain classifier (source vs target) → calibrated odds → importance weights.

    L2 logistic regression with class-balanced weights (the target may be 25 images against
    15 000 source ones), C chosen by stratified k-fold balanced log-loss, then Platt-calibrated
    on the out-of-fold logits. Balanced fitting makes the calibrated odds estimate
    p_t(x)/p_s(x) directly (the n_source/n_target prior correction is built in), and a
    discriminator with no real signal gets a flat calibration slope, hence uniform weights.

    Refinement (`discriminator.refine` rounds, default on): a few dozen target images of other
    classes give a direction that mixes the domain shift with the target classes' content, so
    which 50 images are drawn moves the ranking (benchmarks/README.md). `ratio.refine_axis`
    re-fits the direction within the source on the source's own two-group split along it
    (self-training, thousands of samples), and the odds are then Platt-calibrated, target vs
    source, along that axis: still p_t/p_s, in one dimension, and flat when the target does
    not lean to either side. A split that never settles (no two domains in the source) keeps
    the plain direction.
    """

    def __init__(
        self, params: MatcherParams, class_neutral: bool | None = None, refine: bool = True
    ):
        self.params = params
        self.class_neutral = params.class_neutral if class_neutral is None else class_neutral
        self.refine = params.discriminator.refine if refine else 0
        self.diagnostics: dict[str, float] = {}

    @ratio.single_threaded
    def fit(self, source, target, source_y=None) -> DiscriminatorMatcher:
        check_embeddings(source, target, source_y)
        p, settings = self.params, self.params.discriminator
        rng = np.random.default_rng(p.seed)
        idx = ratio.subsample(len(source), source_y, settings.max_fit_source, rng)
        fit_y = None if source_y is None else source_y[idx]
        self.features = ratio.Features(p.dims, self.class_neutral).fit(source[idx], fit_y)
        t = self.features(target)
        x = np.concatenate([self.features(source[idx]), t])
        d = np.r_[np.zeros(len(idx)), np.ones(len(t))]  # domain label: 1 = target
        folds = min(settings.folds, len(t))
        if folds < 2:  # one target image: nothing to cross-validate or calibrate on
            self.slope, self.bias, oof = 1.0, 0.0, None
            self.C = settings.C or 0.1
        else:
            self.C, oof = ratio.choose_c(x, d, stratified_folds(d, folds, rng), settings.C)
            self.slope, self.bias = ratio.platt(oof, d)
        self.beta = ratio.logistic(x, d, self.C)
        rounds, share, axis = 0, 0.0, None
        if self.refine and len(t) > 1:  # the source's own axis, calibrated on the target
            axis, rounds, share = ratio.refine_axis(x[: len(idx)], self.beta, self.refine)
        if axis is not None:  # else no settled two-domain split: keep the plain direction
            self.beta = axis
            self.slope, self.bias = ratio.platt(x @ axis[:-1], d)
        log_ratio = self._log_ratio(self.features(source))
        self.norm = ratio.Normaliser(p.clip).fit(log_ratio)
        self.weights = ratio.mean_one(self.norm(log_ratio))
        self.diagnostics = {
            "discriminator_C": self.C,
            "calibration_slope": self.slope,
            "fit_source": float(len(idx)),
            "refine_rounds": float(rounds),
            "refined_high_share": share,
            "refined": float(axis is not None),
        }
        self.diagnostics |= ratio.domain_scores(oof, d)
        return self

    def _log_ratio(self, z: np.ndarray) -> np.ndarray:
        return self.slope * (z @ self.beta[:-1] + self.beta[-1]) + self.bias

    @ratio.single_threaded
    def score(self, emb: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        return self.norm(self._log_ratio(self.features(emb)))


class KnnMatcher:
    """Mean cosine similarity to the k nearest target embeddings → softmax weights.

    The similarity is z-scored over the source (so `temperature` means the same for any
    embedding) and w ∝ exp(z / temperature).
    """

    def __init__(self, params: MatcherParams):
        self.params = params
        self.diagnostics: dict[str, float] = {}

    @ratio.single_threaded
    def fit(self, source, target, source_y=None) -> KnnMatcher:
        check_embeddings(source, target, source_y)
        p = self.params
        idx = ratio.subsample(
            len(source), source_y, p.discriminator.max_fit_source, np.random.default_rng(p.seed)
        )
        fit_y = None if source_y is None else source_y[idx]
        self.features = ratio.Features(p.dims, p.class_neutral).fit(source[idx], fit_y)
        self.target = ratio.unit(self.features(target))
        self.k = min(p.knn.k, len(target))
        sim = self._similarity(source)
        self.mu, self.sd = float(sim.mean()), float(sim.std()) + 1e-12
        self.norm = ratio.Normaliser(p.clip).fit(self._log_ratio(sim))
        self.weights = ratio.mean_one(self.norm(self._log_ratio(sim)))
        return self

    def _similarity(self, emb: np.ndarray) -> np.ndarray:
        sims = ratio.unit(self.features(emb)) @ self.target.T
        return np.partition(sims, sims.shape[1] - self.k, axis=1)[:, -self.k :].mean(1)

    def _log_ratio(self, sim: np.ndarray) -> np.ndarray:
        return (sim - self.mu) / self.sd / self.params.knn.temperature

    @ratio.single_threaded
    def score(self, emb: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        return self.norm(self._log_ratio(self._similarity(emb)))


class ClassMatcher:
    """Per source class, the mean discriminator weight (fitted *with* the class signal).

    Classes that look unlike the target get low weight (partial transfer); every sample of a
    class gets the same weight, so `score` needs the labels.
    """

    def __init__(self, params: MatcherParams):
        self.inner = DiscriminatorMatcher(params, class_neutral=False, refine=False)
        self.diagnostics: dict[str, float] = {}

    def fit(self, source, target, source_y=None) -> ClassMatcher:
        if source_y is None:
            raise TlpipeError("the class matcher needs the source labels")
        w = self.inner.fit(source, target, source_y).weights.astype(np.float64)
        self.classes = np.unique(source_y)
        self.class_weight = np.array([w[source_y == c].mean() for c in self.classes])
        self.weights = ratio.mean_one(self.score(source, source_y))
        self.diagnostics = self.inner.diagnostics
        return self

    def score(self, emb: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        if y is None or len(y) != len(emb):
            raise TlpipeError("the class matcher scores by label: pass one label per embedding")
        if not np.isin(y, self.classes).all():
            raise TlpipeError(f"labels outside the fitted classes {self.classes.tolist()}")
        w = self.class_weight[np.searchsorted(self.classes, y)]
        return np.maximum(w, ratio.FLOOR).astype(np.float32)


class UniformMatcher:
    """Every sample weighs 1 (the control)."""

    def __init__(self, params: MatcherParams):
        self.diagnostics: dict[str, float] = {}

    def fit(self, source, target, source_y=None) -> UniformMatcher:
        check_embeddings(source, target, source_y)
        self.weights = np.ones(len(source), np.float32)
        return self

    def score(self, emb: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        return np.ones(len(emb), np.float32)


MATCHERS: dict[str, Callable[[MatcherParams], Matcher]] = {
    "discriminator": DiscriminatorMatcher,
    "knn": KnnMatcher,
    "class": ClassMatcher,
    "uniform": UniformMatcher,
}


def build_matcher(name: str, params: MatcherParams) -> Matcher:
    """A registered matcher, unfitted."""
    if name not in MATCHERS:
        raise TlpipeError(f"unknown matcher {name!r}; choose one of: {', '.join(MATCHERS)}")
    return MATCHERS[name](params)


def domain_diagnostics(source, target, source_y, params: MatcherParams) -> dict[str, float]:
    """Discriminator held-out accuracy and proxy A-distance (for matchers that lack them)."""
    return DiscriminatorMatcher(params).fit(source, target, source_y).diagnostics


# ---------------------------------------------------------------------------- diagnostics


def effective_sample_size(w: np.ndarray) -> float:
    """ESS = (Σw)² / Σw² (n for uniform weights, 1 for a single non-zero weight)."""
    w = np.asarray(w, np.float64)
    return float(w.sum() ** 2 / max((w**2).sum(), 1e-300))


def select_top(w: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of the top `fraction` of samples by weight (ties broken at random), sorted."""
    if not 0 < fraction <= 1:
        raise TlpipeError(f"match.top_fraction must be in (0, 1], got {fraction}")
    n = max(1, round(len(w) * fraction))
    tiebreak = np.random.default_rng(seed).random(len(w))
    order = np.lexsort((tiebreak, -np.asarray(w, np.float64)))
    return np.sort(order[:n]).astype(np.int64)


def summary(
    w: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    shifted: np.ndarray | None,
    selected: np.ndarray,
) -> dict[str, Any]:
    """ESS, per-class mean weight and, where the ground truth is known, selection quality."""
    ess = effective_sample_size(w)
    out: dict[str, Any] = {
        "n_source": len(w),
        "n_selected": len(selected),
        "ess": ess,
        "ess_fraction": ess / len(w),
        "weight_max": float(w.max()),
        "weight_min": float(w.min()),
        "per_class_weight": {
            name: float(w[y == i].mean()) if (y == i).any() else math.nan
            for i, name in enumerate(class_names)
        },
    }
    if shifted is not None and shifted.any():
        out["shifted_fraction"] = float(shifted.mean())
        out["selection_precision"] = float(shifted[selected].mean())
        out["selection_recall"] = float(shifted[selected].sum() / shifted.sum())
        if not shifted.all():
            out["shifted_auroc"] = auroc(shifted, w)
    return out


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half): P(score of a positive > a negative)."""
    labels = np.asarray(labels, bool)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average 1-based ranks
    pos, neg = int(labels.sum()), int((~labels).sum())
    return float((rank[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))
