"""Sample matching: the matchers on synthetic embeddings, and the match step end-to-end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tlpipe.errors import TlpipeError
from tlpipe.match import matchers, ratio
from tlpipe.match.matchers import MATCHERS, Params
from tlpipe.params import DiscriminatorSettings
from tlpipe.params.fields import build

DIM = 24


def shifted_source(
    n: int = 2000, seed: int = 0, n_classes: int = 5, offset: float = 3.0, fraction: float = 0.5
):
    """Source: `n_classes` Gaussian classes; a `fraction` of the samples carry a domain shift.

    Class c sits at `offset`·e_c; the shift adds 3.0 along the last axis and 1.5 to axes
    10-14. Returns (embeddings, labels, shifted flags).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    shifted = rng.random(n) < fraction
    x = rng.standard_normal((n, DIM))
    x[np.arange(n), y] += offset
    x[shifted, -1] += 3.0
    x[shifted, 10:15] += 1.5
    return x, y, shifted


def target_like(n: int = 50, seed: int = 1, new_class: bool = True) -> np.ndarray:
    """Target: shifted, and (new_class) of a class the source lacks that resembles class 0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM))
    x[:, -1] += 3.0
    x[:, 10:15] += 1.5
    if new_class:
        x[:, 0] += 2.0  # resembles source class 0 more than the others
    return x


def _precision(w: np.ndarray, shifted: np.ndarray) -> float:
    return float(shifted[matchers.select_top(w, shifted.mean())].mean())


# ---------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_weights_are_finite_positive_mean_one_and_capped(name: str) -> None:
    x, y, _ = shifted_source()
    w = matchers.fit_weights(matchers.build_matcher(name, Params(clip=5.0)), x, target_like(), y)
    assert w.dtype == np.float32 and w.shape == (len(x),)
    assert np.isfinite(w).all() and (w > 0).all()
    assert abs(float(w.astype(np.float64).mean()) - 1.0) < 1e-5
    assert w.max() <= 5.0 * (1 + 1e-4)


@pytest.mark.parametrize("name", ["discriminator", "knn"])
def test_shifted_samples_rank_first(name: str) -> None:
    x, y, shifted = shifted_source()
    w = matchers.fit_weights(matchers.build_matcher(name, Params()), x, target_like(), y)
    assert matchers.auroc(shifted, w) > 0.95
    assert _precision(w, shifted) > 0.9


def test_class_neutral_features_ignore_the_class_signal() -> None:
    # The target resembles source class 0: a plain discriminator ranks class 0 (shifted or not)
    # first; removing the source-class directions leaves the domain shift to rank by. (Without
    # refinement: refining on the source's own split recovers the shift either way.)
    x, y, shifted = shifted_source(offset=5.0)
    t = target_like()
    t[:, 0] += 3.0
    unrefined = DiscriminatorSettings(refine=0)
    plain = matchers.fit_weights(
        matchers.DiscriminatorMatcher(Params(class_neutral=False, discriminator=unrefined)), x, t, y
    )
    neutral = matchers.fit_weights(
        matchers.DiscriminatorMatcher(Params(discriminator=unrefined)), x, t, y
    )
    refined = matchers.fit_weights(
        matchers.DiscriminatorMatcher(Params(class_neutral=False)), x, t, y
    )
    assert _precision(neutral, shifted) > 0.9
    assert _precision(neutral, shifted) > _precision(plain, shifted) + 0.1
    assert _precision(refined, shifted) > 0.9


def test_two_means_splits_at_the_gap_whatever_the_shares() -> None:
    rng = np.random.default_rng(0)
    for share in (0.1, 0.5, 0.8):
        high = rng.random(4000) < share
        score = rng.standard_normal(4000) + 6.0 * high
        assert (ratio.two_means(score) == high).mean() > 0.99
    assert not ratio.two_means(np.ones(5)).any()  # no spread: no split


@pytest.mark.parametrize("fraction", [0.2, 0.7])
def test_refinement_finds_the_source_domain_axis_at_any_share(fraction: float) -> None:
    # The target is 25 images of a new class: the plain discriminator's direction leans on
    # that class's content, refinement recovers the source's own shifted / clean split.
    x, y, shifted = shifted_source(n=3000, offset=5.0, fraction=fraction)
    t = target_like(n=25)
    t[:, 0] += 3.0
    t[:, 20:23] += 2.0  # content no source class has
    m = matchers.DiscriminatorMatcher(Params()).fit(x, t, y)
    assert _precision(m.weights, shifted) > 0.97
    assert m.diagnostics["refined_high_share"] == pytest.approx(fraction, abs=0.05)
    assert 1 <= m.diagnostics["refine_rounds"] <= Params().discriminator.refine
    assert m.diagnostics["refined"] == 1.0
    plain = DiscriminatorSettings(refine=0)
    w = matchers.DiscriminatorMatcher(Params(discriminator=plain)).fit(x, t, y).weights
    assert _precision(w, shifted) < _precision(m.weights, shifted)


def test_a_split_that_never_settles_keeps_the_plain_direction() -> None:
    rng = np.random.default_rng(0)
    blob = rng.standard_normal((3000, 8))  # one domain: no split along any axis is stable
    assert ratio.refine_axis(blob, np.r_[rng.standard_normal(8), 0.0], 1)[0] is None
    two = blob + 8.0 * (np.arange(3000) % 2 == 0)[:, None]  # two domains: settles
    axis, rounds, share = ratio.refine_axis(two, np.r_[np.ones(8), 0.0], 30)
    assert axis is not None and rounds <= 3 and share == 0.5
    x, y, _ = shifted_source(fraction=0.0)  # the matcher then keeps the plain direction
    one_round, plain = (Params(discriminator=DiscriminatorSettings(refine=r)) for r in (1, 0))
    m = matchers.DiscriminatorMatcher(one_round).fit(x, target_like(), y)
    assert m.diagnostics["refined"] == 0.0
    w = matchers.DiscriminatorMatcher(plain).fit(x, target_like(), y).weights
    np.testing.assert_array_equal(m.weights, w)


def test_same_distribution_gives_near_uniform_weights() -> None:
    x, y, _ = shifted_source(n=3000, seed=3)
    target = shifted_source(n=50, seed=4)[0]
    for name in ("discriminator", "class"):
        m = matchers.build_matcher(name, Params())
        w = matchers.fit_weights(m, x, target, y)
        assert matchers.effective_sample_size(w) / len(w) > 0.8, name
        assert m.diagnostics["discriminator_accuracy"] < 0.7


def test_inductive_scoring_of_new_samples() -> None:
    x, y, _ = shifted_source(seed=0)
    m = matchers.build_matcher("discriminator", Params()).fit(x, target_like(), y)
    np.testing.assert_allclose(m.score(x), m.weights, rtol=1e-4)
    new, _, new_shifted = shifted_source(n=500, seed=9)
    assert matchers.auroc(new_shifted, m.score(new)) > 0.95


def test_discriminator_diagnostics() -> None:
    x, y, _ = shifted_source()
    d = matchers.build_matcher("discriminator", Params()).fit(x, target_like(), y).diagnostics
    # half of the source is target-like, so the best balanced accuracy is about 0.75
    assert 0.6 < d["discriminator_accuracy"] <= 0.8
    assert d["proxy_a_distance"] == pytest.approx(2 * (1 - 2 * (1 - d["discriminator_accuracy"])))
    assert d["discriminator_C"] in ratio.C_GRID and d["calibration_slope"] > 0


def test_class_matcher_weights_whole_classes() -> None:
    x, y, _ = shifted_source(offset=5.0)
    t = target_like()
    t[:, 0] += 3.0  # target looks like source class 0
    m = matchers.build_matcher("class", Params())
    w = matchers.fit_weights(m, x, t, y)
    per_class = [w[y == c] for c in range(5)]
    assert all(np.ptp(v) < 1e-5 for v in per_class)
    assert np.argmax([v[0] for v in per_class]) == 0
    with pytest.raises(TlpipeError, match="needs the source labels"):
        m.fit(x, t)
    with pytest.raises(TlpipeError, match="outside the fitted classes"):
        m.score(x[:2], np.array([0, 9]))


def test_normaliser_water_fills_to_mean_one_under_the_cap() -> None:
    log_ratio = np.random.default_rng(0).standard_normal(10_000) * 4  # heavy-tailed weights
    norm = ratio.Normaliser(clip=3.0).fit(log_ratio)
    w = norm(log_ratio).astype(np.float64)
    assert w.max() <= 3.0 and abs(w.mean() - 1) < 1e-3 and (w == 3.0).sum() > 100
    assert np.all(np.diff(w[np.argsort(log_ratio)]) >= 0)  # monotone in the log-ratio
    with pytest.raises(TlpipeError, match="clip must be >= 1"):
        ratio.Normaliser(0.5)


def test_auroc_and_ess_and_select_top() -> None:
    labels = np.array([1, 0, 1, 0, 1], bool)
    scores = np.array([0.9, 0.1, 0.5, 0.5, 0.2])
    pairs = [(p, q) for p in scores[labels] for q in scores[~labels]]
    brute = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs])
    assert matchers.auroc(labels, scores) == pytest.approx(brute)
    assert matchers.effective_sample_size(np.ones(7)) == pytest.approx(7)
    assert matchers.effective_sample_size(np.r_[1.0, np.zeros(6)]) == pytest.approx(1)
    assert matchers.select_top(np.array([0.9, 0.1, 0.5, 0.4, 0.2]), 0.4).tolist() == [0, 2]
    assert set(matchers.select_top(np.ones(10), 0.5)) != set(range(5))  # ties: random order
    with pytest.raises(TlpipeError, match="top_fraction"):
        matchers.select_top(scores, 0)


# ---------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        (np.ones((5, 4)), np.ones((0, 4)), "no target embeddings"),
        (np.ones((5, 4)), np.ones((3, 6)), "embedding sizes differ"),
        (np.ones((5, 4)), np.full((3, 4), np.nan), "NaN"),
        (np.ones(5), np.ones((3, 4)), "must be 2-d"),
    ],
)
def test_bad_embeddings_are_clear_errors(source, target, message) -> None:
    for name in MATCHERS:
        with pytest.raises(TlpipeError, match=message):
            matchers.build_matcher(name, Params()).fit(source, target, np.zeros(len(source), int))


def test_bad_config_is_a_clear_error() -> None:
    from tlpipe.steps.match import MatchConfig

    with pytest.raises(TlpipeError, match="unknown matcher 'magic'.*discriminator"):
        build(MatchConfig, {"matcher": "magic"})
    with pytest.raises(TlpipeError, match=r"top_fraction = 1.5 is out of range: .* in \(0, 1\]"):
        build(MatchConfig, {"top_fraction": 1.5})
    with pytest.raises(TlpipeError, match="clip = 0.5 is out of range: it must be >= 1"):
        build(MatchConfig, {"clip": 0.5})
    with pytest.raises(TlpipeError, match="discriminator.folds"):
        build(MatchConfig, {"discriminator": {"folds": 1}})
    with pytest.raises(TlpipeError, match="unknown matcher"):
        matchers.build_matcher("magic", Params())


# ---------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def tiny_source_model(tiny_prepared: Path, tmp_path_factory) -> Path:
    from tlpipe.steps import pretrain

    out = tmp_path_factory.mktemp("match_models") / "source.pt"
    cfg = build(pretrain.PretrainConfig, {"train": {"epochs": 1, "batch_size": 32, "lr": 0.05}})
    pretrain.run(tiny_prepared, out, cfg)
    return out


def test_match_step_end_to_end(tiny_prepared: Path, tiny_source_model: Path, tmp_path) -> None:
    from tlpipe.data.manifest import load_manifest
    from tlpipe.data.prepared import load_split
    from tlpipe.steps import match

    out = tmp_path / "matching"
    cfg = build(match.MatchConfig, {"top_fraction": 0.25, "discriminator": {"folds": 3}})
    result = match.run(tiny_prepared, tiny_source_model, out, cfg)
    source = load_split(tiny_prepared, "source")
    w, sel = np.load(out / "weights.npy"), np.load(out / "selected.npy")
    assert w.dtype == np.float32 and w.shape == (len(source),) and (w > 0).all()
    assert abs(float(w.mean()) - 1) < 1e-5
    assert sel.dtype == np.int64 and len(sel) == round(0.25 * len(source))
    assert w[sel].min() >= np.delete(w, sel).max()
    report = json.loads((out / "report.json").read_text())
    for key in (
        "discriminator_accuracy",
        "proxy_a_distance",
        "ess",
        "ess_fraction",
        "selection_precision",
        "per_class_weight",
        "timings",
    ):
        assert key in report, key
    assert report["n_target"] == 50 and report["target_splits"] == ["target_train", "target_val"]
    source_classes = load_manifest(tiny_prepared).source_classes
    assert list(report["per_class_weight"]) == list(source_classes) and len(source_classes) == 5
    assert report["timings"]["embedding_seconds"] > 0 and report["embedding_dim"] > 64
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["extremes.png", "weights_hist.png"]
    assert result.metrics["selection_precision"] == report["selection_precision"]
    assert not list(tmp_path.glob(".matching*"))  # nothing half-written left behind


def test_match_step_other_matchers_and_errors(
    tiny_prepared: Path, tiny_source_model: Path, tmp_path: Path, make_prepared
) -> None:
    from tlpipe.steps import match

    cfg = build(
        match.MatchConfig,
        {"matcher": "knn", "features": "backbone", "plots": False, "use_target_val": False},
    )
    match.run(tiny_prepared, tiny_source_model, tmp_path / "knn", cfg)
    report = json.loads((tmp_path / "knn" / "report.json").read_text())
    assert report["n_target"] == 25 and report["embedding_dim"] == 64
    assert "discriminator_accuracy" in report  # diagnostics even when another matcher weighs
    assert not (tmp_path / "knn" / "plots" / "extremes.png").exists()
    with pytest.raises(TlpipeError, match="not found"):
        match.run(tiny_prepared, tmp_path / "missing.pt", tmp_path / "x", match.MatchConfig())
    clean = make_prepared(shift=[], source_shift_fraction=0.0)  # no shift: no precision key
    match.run(clean, tiny_source_model, tmp_path / "clean", cfg)
    assert "selection_precision" not in json.loads((tmp_path / "clean/report.json").read_text())
