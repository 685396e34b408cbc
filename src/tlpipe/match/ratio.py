"""Density-ratio building blocks for `tlpipe.match.matchers` (numpy only).

`Features` (the shared embedding map), `Normaliser` (log-ratio → capped, mean-1 weights), a
small class-balanced L2 logistic regression solved by Newton steps with k-fold choice of C and
Platt calibration, and the held-out domain scores.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import numpy as np

from tlpipe.errors import TlpipeError

FLOOR = 1e-4  # smallest weight (relative to the mean 1): weights stay positive
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # discriminator inverse L2 strengths tried by CV


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run numpy's BLAS single-threaded: the matrices here are small (d ≤ a few hundred), and a
    multi-threaded OpenBLAS on a busy machine is far slower on them (benchmarks/README.md)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, run as is
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def single_threaded(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return method(*args, **kwargs)

    return wrapper


def check_emb(emb: np.ndarray, dim: int) -> None:
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise TlpipeError(f"embeddings to score must be (n, {dim}), got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise TlpipeError("embeddings to score contain NaN/inf")


# ---------------------------------------------------------------------------- features


class Features:
    """standardise → L2-normalise → (class-neutral projection) → top-`dims` PCA, fit on source."""

    def __init__(self, dims: int = 32, class_neutral: bool = True):
        self.dims, self.class_neutral = dims, class_neutral

    def fit(self, source: np.ndarray, source_y: np.ndarray | None = None) -> Features:
        source = np.asarray(source, np.float64)
        self.dim = source.shape[1]
        self.mean, self.std = source.mean(0), source.std(0) + 1e-6
        z = self._normalised(source)
        basis = np.eye(self.dim)
        if self.class_neutral and source_y is not None and len(np.unique(source_y)) > 1:
            means = np.stack([z[source_y == c].mean(0) for c in np.unique(source_y)])
            _, s, vt = np.linalg.svd(means - means.mean(0), full_matrices=False)
            between = vt[s > 1e-6 * s.max()]
            basis = basis - between.T @ between  # projector onto the within-class space
        z = z @ basis
        centre = z.mean(0)
        # PCA via the covariance's eigenvectors (d × d): cheap for any n.
        evals, evecs = np.linalg.eigh((z - centre).T @ (z - centre) / max(len(z) - 1, 1))
        top = evecs[:, np.argsort(evals)[::-1][: max(1, min(self.dims, self.dim))]]
        self.map, self.offset = basis @ top, centre @ top  # normalised input → output, one matmul
        return self

    def _normalised(self, emb: np.ndarray) -> np.ndarray:
        z = (np.asarray(emb, np.float64) - self.mean) / self.std
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        check_emb(emb, self.dim)
        return self._normalised(emb) @ self.map - self.offset


def subsample(n: int, y: np.ndarray | None, m: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `m` of `n` indices, class-stratified when labels are given."""
    if n <= m:
        return np.arange(n)
    if y is None:
        return np.sort(rng.choice(n, m, replace=False))
    picked = [
        rng.choice(idx, max(1, round(m * len(idx) / n)), replace=False)
        for idx in (np.flatnonzero(y == c) for c in np.unique(y))
    ]
    return np.sort(np.concatenate(picked))


# ---------------------------------------------------------------------------- weights


class Normaliser:
    """exp(log-ratio), scaled to mean 1 over the source and capped at `clip` × the mean.

    The cap is "water-filling": the scale is chosen so that the mean is 1 *after* capping, so
    the capped mass is spread over the others instead of being lost.
    """

    def __init__(self, clip: float):
        if not clip >= 1:
            raise TlpipeError(f"match.clip must be >= 1 (the max weight / mean), got {clip}")
        self.clip = clip

    def fit(self, log_ratio: np.ndarray) -> Normaliser:
        top = float(log_ratio.max())
        e = np.sort(np.exp(np.maximum(log_ratio - top, -60.0)))[::-1]  # descending, all > 0
        n, k = len(e), np.arange(len(e))
        tail = np.cumsum(e[::-1])[::-1]  # tail[k] = e[k:].sum()
        room = n - k * self.clip  # mass left for the uncapped after capping the k largest
        scale = np.where(room > 0, room, np.nan) / tail
        ok = scale * e <= self.clip * (1 + 1e-9)  # the (k+1)-th largest stays under the cap
        self.shift = math.log(scale[int(np.argmax(ok))]) - top  # a valid k exists for clip >= 1
        return self

    def __call__(self, log_ratio: np.ndarray) -> np.ndarray:
        w = np.exp(np.minimum(log_ratio + self.shift, math.log(self.clip)))
        return np.clip(w, FLOOR, self.clip).astype(np.float32)


def mean_one(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return (w / w.mean()).astype(np.float32)


# ---------------------------------------------------------------------------- logistic regression


def logistic(x, d, C: float, beta: np.ndarray | None = None, iters: int = 50) -> np.ndarray:
    """Class-balanced L2 logistic regression by damped Newton steps; returns [coef..., bias].

    Minimises C·Σ bᵢ·logloss_i + ½‖coef‖² with balanced sample weights bᵢ (sklearn's
    ``class_weight="balanced"``); the bias is not penalised. d ≤ a few dozen: each step is a
    tiny linear solve, far faster than a general solver.
    """
    x1 = np.c_[x, np.ones(len(x))]
    sw = np.where(d == 1, 0.5 / max(d.sum(), 1), 0.5 / max((1 - d).sum(), 1)) * len(d) * C
    reg = np.r_[np.ones(x.shape[1]), 1e-8]
    beta = np.zeros(x1.shape[1]) if beta is None else beta.copy()

    def loss(b: np.ndarray) -> float:
        z = x1 @ b
        return float(sw @ np.logaddexp(0.0, np.where(d == 1, -z, z)) + 0.5 * reg @ b**2)

    current = loss(beta)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x1 @ beta)))
        grad = x1.T @ (sw * (p - d)) + reg * beta
        hess = (x1 * (sw * p * (1 - p))[:, None]).T @ x1 + np.diag(reg)
        step, t = np.linalg.solve(hess, grad), 1.0
        while t > 1e-4 and loss(beta - t * step) > current:  # backtrack if Newton overshoots
            t /= 2
        beta, previous, current = beta - t * step, current, loss(beta - t * step)
        if previous - current < 1e-10 * max(1.0, abs(current)):
            break
    return beta


def choose_c(x, d, fold: np.ndarray, fixed: float | None) -> tuple[float, np.ndarray]:
    """Pick C by out-of-fold balanced log-loss (`fold`: each row's fold index); returns C and
    its out-of-fold logits."""
    folds = [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in np.unique(fold)]
    x1 = np.c_[x, np.ones(len(x))]
    betas: list[np.ndarray | None] = [None] * len(folds)  # warm starts along the C path
    best: tuple[float, float, np.ndarray] = (math.inf, 0.0, np.zeros(len(d)))
    for C in (fixed,) if fixed is not None else C_GRID:
        oof = np.zeros(len(d))
        for i, (train, test) in enumerate(folds):
            betas[i] = logistic(x[train], d[train], C, betas[i])
            oof[test] = x1[test] @ betas[i]
        loss = balanced_log_loss(oof, d)
        if loss < best[0]:
            best = (loss, C, oof)
    return best[1], best[2]


REFINE_C = 0.1  # the within-source classifier's inverse L2 strength (refine_axis)


def refine_axis(
    x: np.ndarray, beta: np.ndarray, rounds: int
) -> tuple[np.ndarray | None, int, float]:
    """Turn a target-vs-source direction into the source's own domain axis (self-training).

    A mixed source is two clusters along the domain shift, but with a few dozen target images
    of *other classes* the discriminator's direction mixes that shift with the target classes'
    content. Here the source is split in two along the current direction (`two_means`: the
    largest gap in between-group variance, no fraction assumed), a class-balanced logistic
    regression learns that split from the source itself (thousands of samples, not 50), and
    the split is redrawn along the new direction until it stops moving. Returns the direction
    (bias 0), the rounds run, and the share of the source on the high side; the direction is
    None when the split still moves after `rounds` (a source without two domains, as in the
    default scenario; benchmarks/README.md).
    """
    label = two_means(x @ beta[:-1])
    for done in range(1, rounds + 1):
        if label.all() or not label.any():
            return None, done - 1, float(label.mean())
        beta = logistic(x, label, REFINE_C, beta)
        new = two_means(x @ beta[:-1])
        if np.array_equal(new, label):
            return np.r_[beta[:-1], 0.0], done, float(label.mean())
        label = new
    return None, rounds, float(label.mean())


def two_means(score: np.ndarray) -> np.ndarray:
    """1 where `score` is above the threshold that maximises the between-group variance."""
    if len(score) < 2 or not np.ptp(score) > 0:
        return np.zeros(len(score))
    s = np.sort(score)
    n, k, total = len(s), np.arange(1, len(s)), np.cumsum(s)
    low, high = total[:-1] / k, (total[-1] - total[:-1]) / (n - k)
    return (score > s[int(np.argmax(k * (n - k) * (low - high) ** 2))]).astype(np.float64)


def balanced_log_loss(logit: np.ndarray, d: np.ndarray) -> float:
    nll = np.logaddexp(0.0, -np.where(d == 1, logit, -logit))
    return float(0.5 * nll[d == 1].mean() + 0.5 * nll[d == 0].mean())


def platt(logit: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """Balanced Platt scaling on held-out logits: p = σ(a·logit + b), a >= 0."""
    slope, bias = logistic(logit[:, None], d, C=1e4)
    return (float(slope), float(bias)) if slope > 0 else (0.0, 0.0)  # no signal → uniform


def domain_scores(oof: np.ndarray | None, d: np.ndarray) -> dict[str, float]:
    """Held-out balanced accuracy of the domain classifier and the proxy A-distance."""
    if oof is None:
        return {"discriminator_accuracy": math.nan, "proxy_a_distance": math.nan}
    acc = 0.5 * float((oof[d == 1] > 0).mean() + (oof[d == 0] <= 0).mean())
    return {"discriminator_accuracy": acc, "proxy_a_distance": 2.0 * (1.0 - 2.0 * (1.0 - acc))}


def unit(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
