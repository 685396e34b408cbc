"""Models registry, pretrain, every fine-tune strategy, evaluate — on tiny prepared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import stratified_folds
from tlpipe.errors import TlpipeError
from tlpipe.params.fields import build
from tlpipe.steps import evaluate, finetune, pretrain
from tlpipe.train import resume
from tlpipe.train.checkpoint import CheckpointMeta
from tlpipe.train.models import MODELS, build_model, load_checkpoint, save_checkpoint, seeded

TINY_TRAIN = {"epochs": 2, "batch_size": 32, "steps_per_epoch": 3, "lr": 0.05}


@pytest.fixture(scope="module")
def source_model(tiny_prepared: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "source.pt"
    cfg = build(pretrain.PretrainConfig, {"train": {**TINY_TRAIN, "epochs": 3}})
    pretrain.run(tiny_prepared, out, cfg)
    return out


def test_pretrain_is_reproducible_whatever_ran_before(tiny_prepared: Path, tmp_path: Path) -> None:
    # The CLI imports libraries that draw from torch's global RNG; the model's initial weights
    # must come from `train.seed` alone (a hash-seed-dependent init once failed CI).
    cfg = build(pretrain.PretrainConfig, {"train": {**TINY_TRAIN, "epochs": 1}})
    states = []
    for i, rng_seed in enumerate((1, 2)):
        torch.manual_seed(rng_seed)
        pretrain.run(tiny_prepared, tmp_path / f"{i}.pt", cfg)
        states.append(load_checkpoint(tmp_path / f"{i}.pt")[0].state_dict())
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k
    other = build(pretrain.PretrainConfig, {"train": {**TINY_TRAIN, "epochs": 1, "seed": 1}})
    pretrain.run(tiny_prepared, tmp_path / "seed1.pt", other)
    first_conv = load_checkpoint(tmp_path / "seed1.pt")[0].state_dict()["backbone.0.0.weight"]
    assert not torch.equal(first_conv, states[0]["backbone.0.0.weight"])


def _cfg(strategy: str, **extra) -> finetune.FinetuneConfig:
    # selection by validation alone (min_val 0) unless a test asks for cross-validation
    values = {
        "strategy": strategy,
        "train": TINY_TRAIN,
        "probe": TINY_TRAIN,
        "selection": {"min_val": 0},
        **extra,
    }
    return build(finetune.FinetuneConfig, values)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "mobilenet_v3_small"])
def test_models_build_with_backbone_head_split(name: str) -> None:
    net = build_model(name, num_classes=3, in_chans=1)
    x = torch.zeros(2, 1, 28, 28)
    assert net(x).shape == (2, 3)
    assert net.backbone(x).shape == (2, net.feat_dim)
    assert len(net.blocks()) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_grey_small_and_rgb_full_size(name: str) -> None:
    with torch.device("meta"):  # shapes only (the default suite builds one of each family)
        net = build_model(name, num_classes=3, in_chans=1)
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
        net = build_model(name, num_classes=3, in_chans=3, input_size=224)
        assert net.backbone(torch.zeros(2, 3, 224, 224)).shape == (2, net.feat_dim)
    assert len(net.blocks()) >= 4


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(TlpipeError, match="unknown model 'vgg'.*small_cnn"):
        build_model("vgg", 5)


def test_torchvision_weights_load_from_local_file(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    tv = resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    net = build_model(
        "resnet18", 5, in_chans=1, input_size=28, pretrained=tmp_path / "resnet18.pth"
    )
    torch.testing.assert_close(net.blocks()[1][0].conv1.weight, tv.layer1[0].conv1.weight)
    torch.testing.assert_close(net.blocks()[4][1].bn2.running_var, tv.layer4[1].bn2.running_var)
    with pytest.raises(TlpipeError, match="not found"):
        build_model("resnet18", 5, pretrained=tmp_path / "missing.pth")


def test_checkpoint_roundtrip_and_bad_file(tmp_path: Path) -> None:
    net = build_model("small_cnn", 4)
    meta = CheckpointMeta(
        arch="small_cnn", in_chans=1, input_size=28, classes=tuple("abcd"), mean=(0.3,), std=(0.2,)
    )
    save_checkpoint(tmp_path / "m.pt", net, meta)
    back, read = load_checkpoint(tmp_path / "m.pt")
    assert read == meta and read.num_classes == 4 and not back.training
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(TlpipeError, match="not a readable tlpipe model"):
        load_checkpoint(tmp_path / "bad.pt")


def _changed(a: torch.nn.Module, b: torch.nn.Module) -> list[bool]:
    return [not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True)]


def test_linear_probe_only_changes_the_head(tiny_prepared, source_model, tmp_path) -> None:
    out = tmp_path / "lp.pt"
    finetune.run(tiny_prepared, source_model, out, _cfg("linear_probe"))
    src, _ = load_checkpoint(source_model)
    tuned, meta = load_checkpoint(out)
    assert not any(_changed(src.backbone, tuned.backbone))
    assert torch.equal(src.backbone[0][1].running_mean, tuned.backbone[0][1].running_mean)
    assert meta.classes == load_manifest(tiny_prepared).target_classes and meta.classes


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_the_probe_is_logistic_regression_on_the_features_whatever_their_scale(
    scale: float, tiny_prepared, source_model, tmp_path, capfd
) -> None:
    """The solved head predicts what scikit-learn's LogisticRegression (C = 1 / probe_l2) on the
    centred features, scaled to a mean squared norm of 1, predicts; features a thousand times
    smaller change nothing (the SGD head's failure on weak backbones)."""
    from sklearn.linear_model import LogisticRegression

    from tlpipe.data.prepared import load_split
    from tlpipe.train.loop import embed, predict

    src, meta = load_checkpoint(source_model)
    with torch.no_grad():  # the last BatchNorm's output × scale, and so (ReLU, mean pool) every
        last_bn = [m for m in src.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        last_bn.weight.mul_(scale)  # feature
        last_bn.bias.mul_(scale)
    scaled = tmp_path / "scaled-source.pt"
    save_checkpoint(scaled, src, meta)
    out = tmp_path / "lp.pt"
    finetune.run(tiny_prepared, scaled, out, _cfg("linear_probe", probe_l2=2.0))
    assert "logistic regression on" in capfd.readouterr().err

    tuned, tmeta = load_checkpoint(out)
    train = load_split(tiny_prepared, "target_train")
    test = load_split(tiny_prepared, "target_test")
    f_train = embed(tuned, train.x, tmeta.mean, tmeta.std).astype(np.float64)
    f_test = embed(tuned, test.x, tmeta.mean, tmeta.std).astype(np.float64)
    centre = f_train.mean(0)
    scale = np.sqrt(((f_train - centre) ** 2).sum(1).mean())
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000)
    reference.fit((f_train - centre) / scale, train.y)
    expected = reference.predict_proba((f_test - centre) / scale)
    logits = predict(tuned, test.x, tmeta.mean, tmeta.std).astype(np.float64)
    got = np.exp(logits - logits.max(1, keepdims=True))
    got /= got.sum(1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_the_probes_l2_is_chosen_by_cv_strong_for_noise_weak_for_signal() -> None:
    from tlpipe.train.probe import L2_GRID, choose_l2

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    noise = torch.from_numpy(rng.standard_normal((40, 16)))
    signal = torch.from_numpy(np.eye(4)[y] @ rng.standard_normal((4, 16)) * 3) + 0.3 * noise
    labels = torch.from_numpy(y)
    assert choose_l2(noise, labels, 4, seed=0) == (max(L2_GRID), "5-fold CV over 6 values")
    assert choose_l2(signal, labels, 4, seed=0)[0] <= 1.0
    one_image = torch.from_numpy(y[:31])  # class 3: one image
    assert choose_l2(noise[:31], one_image, 4, seed=0)[0] == 1.0


def test_partial_trains_only_the_last_blocks(tiny_prepared, source_model, tmp_path) -> None:
    out = tmp_path / "partial.pt"
    finetune.run(tiny_prepared, source_model, out, _cfg("partial", partial_blocks=1))
    src, _ = load_checkpoint(source_model)
    tuned, _ = load_checkpoint(out)
    blocks_changed = [
        any(_changed(a, b)) for a, b in zip(src.blocks(), tuned.blocks(), strict=True)
    ]
    assert blocks_changed == [False, False, False, True]


def test_full_with_l2sp_stays_closer_to_source(tiny_prepared, source_model, tmp_path) -> None:
    src, _ = load_checkpoint(source_model)
    dist = {}
    for l2sp in (0.0, 10.0):
        out = tmp_path / f"full_{l2sp}.pt"
        finetune.run(
            tiny_prepared, source_model, out, _cfg("full", l2sp=l2sp, backbone_lr_scale=1.0)
        )
        tuned, _ = load_checkpoint(out)
        pairs = zip(src.backbone.parameters(), tuned.backbone.parameters(), strict=True)
        dist[l2sp] = sum(((a - b) ** 2).sum().item() for a, b in pairs)
    assert 0 < dist[10.0] < dist[0.0]


def test_lp_ft_runs_two_phases_and_scratch_ignores_source(tiny_prepared, source_model, tmp_path):
    res = finetune.run(tiny_prepared, source_model, tmp_path / "lpft.pt", _cfg("lp_ft"))
    assert [r["phase"] for r in res.history] == ["probe", "full", "full"]  # the probe: solved
    sgd = _cfg("lp_ft", probe_solver="sgd")
    res = finetune.run(tiny_prepared, source_model, tmp_path / "lpft-sgd.pt", sgd)
    assert [r["phase"] for r in res.history] == ["probe", "probe", "full", "full"]
    res = finetune.run(
        tiny_prepared, None, tmp_path / "scratch.pt", _cfg("scratch", model="small_cnn")
    )
    assert 0 <= res.metrics["target_val_accuracy"] <= 1


def test_lp_ft_probe_phase_leaves_the_backbone_and_its_batchnorm_alone(
    tiny_prepared, source_model, tmp_path
) -> None:
    """Phases are built up front; each must set its own trainable set when it runs."""
    # the SGD probe's resume file; the full phase blows up...
    diverging = _cfg("lp_ft", probe_solver="sgd", train={**TINY_TRAIN, "lr": 1e38})
    with pytest.raises(TlpipeError, match="NaN/inf"):
        finetune.run(
            tiny_prepared,
            source_model,
            tmp_path / "lpft.pt",
            diverging,
            checkpoint_dir=tmp_path / "ck",
        )
    assert not (tmp_path / "lpft.pt").exists()  # ...and a failed step keeps its resume files
    after_probe = resume.load_state(tmp_path / "ck/probe.pt", torch.device("cpu"))["best_state"]
    src, _ = load_checkpoint(source_model)
    for key, value in src.backbone.state_dict().items():
        assert torch.equal(value, after_probe[f"backbone.{key}"]), key


def test_per_strategy_overrides_and_bad_strategy(tiny_prepared, source_model, tmp_path) -> None:
    cfg = _cfg("full", per_strategy={"scratch": {"train": {"lr": 0.5}}})
    assert cfg.for_strategy("scratch").train.lr == 0.5
    assert cfg.for_strategy("scratch").train.epochs == TINY_TRAIN["epochs"]
    assert cfg.for_strategy("full").train.lr == TINY_TRAIN["lr"]
    # a user's per_strategy lies over the defaults (scratch's lr, lp_ft's SGD probe), not instead
    mine = build(finetune.FinetuneConfig, {"per_strategy": {"scratch": {"train": {"epochs": 3}}}})
    assert mine.for_strategy("scratch").train.lr == 0.05
    assert mine.for_strategy("scratch").train.epochs == 3
    assert mine.for_strategy("lp_ft").probe_solver == "sgd"
    assert mine.for_strategy("linear_probe").probe_solver == "lbfgs"
    with pytest.raises(TlpipeError, match="unknown strategy 'magic'"):
        finetune.run(tiny_prepared, source_model, tmp_path / "x.pt", _cfg("magic"))
    with pytest.raises(TlpipeError, match="needs a source model"):
        finetune.run(tiny_prepared, None, tmp_path / "x.pt", _cfg("full"))
    with pytest.raises(TlpipeError, match="partial_blocks"):
        finetune.run(
            tiny_prepared, source_model, tmp_path / "x.pt", _cfg("partial", partial_blocks=9)
        )
    assert not (tmp_path / "x.pt").exists()


def test_classification_metrics_on_known_predictions() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = evaluate.classification_metrics(y, pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_evaluate_selects_by_validation_and_writes_plots(tiny_prepared, source_model, tmp_path):
    models = {}
    for s in ("scratch", "linear_probe", "full"):
        models[s] = tmp_path / f"{s}.pt"
        finetune.run(tiny_prepared, source_model, models[s], _cfg(s))
    # the highest validation accuracy ships, tie or not
    cfg = evaluate.EvaluateConfig(on_tie="best", select_by="accuracy", guard=None)
    res = evaluate.run(tiny_prepared, models, tmp_path / "eval", cfg)
    from tlpipe.fsio import read_json

    report = read_json(res.metrics_path)
    scores = {
        n: (report["models"][n]["val_accuracy"], -report["models"][n]["val_loss"], n == "scratch")
        for n in ("scratch", "linear_probe", "full")
    }
    # the highest validation accuracy ships (scratch is a candidate like the others)
    assert report["selected"] == max(scores, key=scores.get)
    assert report["paired"]["model"] == max(("linear_probe", "full"), key=scores.get)
    assert set(report["gain_over_scratch"]) == {"linear_probe", "full"}
    for f in (
        "plots/confusion_full.png",
        "plots/curves.csv",
        "plots/predictions.csv",
        "selected.txt",
    ):
        assert (tmp_path / "eval" / f).stat().st_size > 0
    table = evaluate.format_table(report)
    assert "scratch" in table and "selected (by val)" in table
    assert "architectures: transfer small_cnn vs scratch small_cnn (like for like)" in table
    with pytest.raises(TlpipeError, match="baseline model 'scratch' missing"):
        evaluate.run(
            tiny_prepared, {"full": models["full"]}, tmp_path / "e2", evaluate.EvaluateConfig()
        )


@pytest.mark.parametrize("names", [("aaa", "zzz"), ("zzz", "aaa")])
def test_a_validation_tie_is_broken_by_validation_loss_not_by_name(
    names, tiny_prepared, source_model, tmp_path
) -> None:
    import torch

    from tlpipe.fsio import read_json
    from tlpipe.train.models import load_checkpoint, save_checkpoint

    models = {"scratch": tmp_path / "scratch.pt", names[0]: tmp_path / "a.pt"}
    finetune.run(tiny_prepared, source_model, models["scratch"], _cfg("scratch"))
    finetune.run(tiny_prepared, source_model, models[names[0]], _cfg("linear_probe"))
    model, meta = load_checkpoint(models[names[0]])
    with torch.no_grad():  # same argmax everywhere (same accuracy), other confidence (loss)
        model.head.weight.mul_(3.0)
        model.head.bias.mul_(3.0)
    models[names[1]] = save_checkpoint(tmp_path / "b.pt", model, meta)
    cfg = evaluate.EvaluateConfig(select_by="accuracy", guard=None)
    report = read_json(evaluate.run(tiny_prepared, models, tmp_path / "e", cfg).metrics_path)
    a, b = (report["models"][n] for n in names)
    assert a["val_accuracy"] == b["val_accuracy"] and a["val_loss"] != b["val_loss"]
    # the better of the two is the one compared with scratch (and ships if it helps)
    assert report["paired"]["model"] == min(names, key=lambda n: report["models"][n]["val_loss"])


def test_scratch_ships_when_no_transfer_beats_it_on_validation(tiny_prepared, tmp_path) -> None:
    from tlpipe.fsio import read_json
    from tlpipe.train.models import build_model, load_checkpoint, save_checkpoint

    models = {"scratch": tmp_path / "scratch.pt", "full": tmp_path / "full.pt"}
    longer = {**TINY_TRAIN, "epochs": 15, "steps_per_epoch": 5}
    finetune.run(
        tiny_prepared, None, models["scratch"], _cfg("scratch", train=longer, model="small_cnn")
    )
    _, meta = load_checkpoint(models["scratch"])
    with seeded(123):  # an untrained "transfer" model: worse than scratch on validation
        untrained = build_model("small_cnn", meta.num_classes, meta.in_chans)
    save_checkpoint(models["full"], untrained, meta)
    res = evaluate.run(tiny_prepared, models, tmp_path / "eval", evaluate.EvaluateConfig())
    report = read_json(res.metrics_path)
    assert report["models"]["scratch"]["val_accuracy"] > report["models"]["full"]["val_accuracy"]
    assert res.selected == report["selected"] == "scratch" and not report["transfer_helped"]
    assert "transfer did NOT help" in res.summary and "scratch ships" in report["verdict"]
    assert (tmp_path / "eval/selected.txt").read_text().strip() == "scratch"
    assert "transfer did NOT help" in evaluate.format_table(report)


def test_scratch_is_the_source_architecture_unless_set(tiny_prepared, tmp_path) -> None:
    """Like for like: scratch trains the transfer models' network with random weights."""
    from tlpipe.params.resolver import resolve

    assert resolve({"pretrain": {"model": "resnet18"}})["finetune"].model == "resnet18"
    explicit = {"pretrain": {"model": "resnet18"}, "finetune": {"model": "small_cnn"}}
    assert resolve(explicit)["finetune"].model == "small_cnn"
    tiny = {**TINY_TRAIN, "epochs": 1}
    src = tmp_path / "source.pt"
    pretrain.run(
        tiny_prepared, src, build(pretrain.PretrainConfig, {"model": "resnet18", "train": tiny})
    )
    finetune.run(tiny_prepared, src, tmp_path / "scratch.pt", _cfg("scratch", train=tiny))
    finetune.run(tiny_prepared, src, tmp_path / "lp.pt", _cfg("linear_probe", probe=tiny))
    scratch, meta = load_checkpoint(tmp_path / "scratch.pt")
    assert meta.arch == "resnet18" and meta.strategy == "scratch"
    source, _ = load_checkpoint(src)
    assert any(_changed(source.backbone, scratch.backbone))  # random init, not the source's
    models = {"scratch": tmp_path / "scratch.pt", "linear_probe": tmp_path / "lp.pt"}
    finetune.run(
        tiny_prepared, src, tmp_path / "small.pt", _cfg("scratch", train=tiny, model="small_cnn")
    )
    report = evaluate.run(tiny_prepared, models, tmp_path / "e", evaluate.EvaluateConfig())
    from tlpipe.fsio import read_json

    line = read_json(report.metrics_path)["architectures"]
    assert line == "architectures: transfer resnet18 vs scratch resnet18 (like for like)"
    models["scratch"] = tmp_path / "small.pt"
    report = evaluate.run(tiny_prepared, models, tmp_path / "e2", evaluate.EvaluateConfig())
    assert "NOT like for like" in read_json(report.metrics_path)["architectures"]
    with pytest.raises(TlpipeError, match="no source model"):
        finetune.run(tiny_prepared, None, tmp_path / "x.pt", _cfg("scratch", train=tiny))


# ---------------------------------------------------------------------------- selection


def test_stratified_folds_are_balanced_and_the_same_for_the_same_labels() -> None:
    y = np.repeat(np.arange(5), 10)
    fold = stratified_folds(y, 3, seed=0)
    assert np.array_equal(fold, stratified_folds(y, 3, seed=0))
    assert not np.array_equal(fold, stratified_folds(y, 3, seed=1))
    assert sorted(np.bincount(fold).tolist()) == [16, 17, 17]
    for c in range(5):  # each class spread over every fold (10 images: 3/3/4)
        assert sorted(np.bincount(fold[y == c], minlength=3).tolist()) == [3, 3, 4]


def test_small_validation_cross_validates_over_train_and_val(tiny_prepared, source_model, tmp_path):
    from tlpipe.data.prepared import load_split

    cv_cfg = {"min_val": 26, "folds": 3, "epoch_fraction": 0.5}  # tiny val has 25 images
    res = finetune.run(
        tiny_prepared, source_model, tmp_path / "lp.pt", _cfg("linear_probe", selection=cv_cfg)
    )
    cv = load_checkpoint(tmp_path / "lp.pt")[1].selection_cv
    train, val = load_split(tiny_prepared, "target_train"), load_split(tiny_prepared, "target_val")
    assert len(cv["ids"]) == len(cv["correct"]) == len(train) + len(val) == 50
    assert cv["ids"][: len(train)] == [str(k) for k in train.ids]  # never a test image
    assert cv["folds"] == cv["fits"] == 3 and cv["accuracy"] == pytest.approx(
        np.mean(cv["correct"])
    )
    # the probability of the true class, out of fold: the argmax when right, < 1/2 when wrong
    k = len(load_manifest(tiny_prepared).target_classes)
    right, p = np.asarray(cv["correct"], bool), np.asarray(cv["p_true"])
    assert len(p) == 50 and (p[right] >= 1 / k).all() and (p[~right] < 0.5).all()
    assert res.metrics["cv_extra_fits"] == 3.0 and "3-fold CV accuracy" in res.summary
    finetune.run(
        tiny_prepared,
        source_model,
        tmp_path / "big.pt",
        _cfg("linear_probe", selection={**cv_cfg, "min_val": 25}),
    )
    assert load_checkpoint(tmp_path / "big.pt")[1].selection_cv is None


def test_after_cv_the_shipped_model_is_refit_on_train_and_val(
    tiny_prepared, source_model, tmp_path, capsys
) -> None:
    from tlpipe.fsio import read_json

    cv_cfg = {"min_val": 26, "folds": 2, "epoch_fraction": 0.5}
    paths = {name: tmp_path / f"{name}.pt" for name in ("scratch", "full", "kept")}
    res = {
        name: finetune.run(
            tiny_prepared,
            source_model,
            path,
            _cfg(
                "full" if name == "kept" else name,
                selection={**cv_cfg, "refit": name != "kept"},
            ),
        )
        for name, path in paths.items()
    }
    # the log says which fit is which: the shipped model's lines, then each CV fit's
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("full:full")]
    fits = [ln.split(" epoch")[0] for ln in lines if " epoch 1/" in ln]
    assert fits[:3] == ["full:full", "full:full (CV fit 1/2)", "full:full (CV fit 2/2)"], fits
    # refit: all 50 labelled images, the last epoch, no held-out validation to report
    assert "trained on target train + val (50 images, the last epoch" in res["full"].summary
    assert "target_val_accuracy" not in res["full"].metrics
    assert "target_val_accuracy" in res["kept"].metrics  # refit: false picks its epoch on val
    refit, kept = (load_checkpoint(paths[n]) for n in ("full", "kept"))
    assert refit[1].selection_cv["refit"] and not kept[1].selection_cv["refit"]
    assert all("val_accuracy" not in row for row in refit[1].history)
    assert any("val_accuracy" in row for row in kept[1].history)
    assert refit[1].selection_cv["correct"] == kept[1].selection_cv["correct"]  # same CV
    a, b = refit[0].state_dict(), kept[0].state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    # evaluate chooses on the CV and shows no validation accuracy for the refit models
    out = tmp_path / "e"
    models = {"scratch": paths["scratch"], "full": paths["full"]}
    report = read_json(
        evaluate.run(tiny_prepared, models, out, evaluate.EvaluateConfig()).metrics_path
    )
    assert "cross-validation" in report["selected_by"]
    assert all(
        m["val_accuracy"] != m["val_accuracy"] and m["refit"] for m in report["models"].values()
    )
    assert "   refit" in evaluate.format_table(report)


def test_repeated_cv_draws_new_folds_and_seeds_and_scores_shares(
    tiny_prepared, source_model, tmp_path
):
    cv_cfg = {"min_val": 26, "folds": 3, "epoch_fraction": 0.5}
    plain, twice = tmp_path / "plain.pt", tmp_path / "twice.pt"
    finetune.run(tiny_prepared, source_model, plain, _cfg("scratch", selection=cv_cfg))
    res = finetune.run(
        tiny_prepared, source_model, twice, _cfg("scratch", selection={**cv_cfg, "repeats": 2})
    )
    one, two = (load_checkpoint(p)[1].selection_cv for p in (plain, twice))
    assert set(one["correct"]) <= {0, 1} and set(two["correct"]) <= {0, 0.5, 1}
    assert 0.5 in two["correct"]  # another draw of folds and seeds got some images otherwise
    assert two["fits"] == 6 and two["repeats"] == 2 and res.metrics["cv_extra_fits"] == 6.0
    assert two["accuracy"] == pytest.approx(np.mean(two["correct"]))
    # the final model does not depend on the CV: same weights with 1 or 2 repeats
    a, b = (load_checkpoint(p)[0].state_dict() for p in (plain, twice))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # evaluate pairs models only on the same CV: here, both repeated
    lp = tmp_path / "lp.pt"
    finetune.run(
        tiny_prepared, source_model, lp, _cfg("linear_probe", selection={**cv_cfg, "repeats": 2})
    )
    report = evaluate.run(
        tiny_prepared,
        {"scratch": twice, "linear_probe": lp},
        tmp_path / "e",
        evaluate.EvaluateConfig(plots=False),
    )
    from tlpipe.fsio import read_json

    m = read_json(report.metrics_path)
    assert "2× repeated 3-fold stratified cross-validation" in m["selected_by"]
    assert "12 extra fits (6 per model × 2 models)" in m["selected_by"]
    # one model with plain CV: no common evidence, and validation can't decide either: the
    # models trained on it (finetune.selection.refit)
    with pytest.raises(TlpipeError, match="trained on target_val .* do not pair"):
        evaluate.run(
            tiny_prepared,
            {"scratch": plain, "linear_probe": lp},
            tmp_path / "e2",
            evaluate.EvaluateConfig(plots=False),
        )


def _with_cv(src: Path, out: Path, correct: list[int], p_true: list[float] | None = None) -> Path:
    """A copy of checkpoint `src` carrying made-up out-of-fold results on 50 images (the
    probability of the true class: 0.8 where right, 0.2 where wrong, unless given)."""
    model, meta = load_checkpoint(src)
    cv = {
        "ids": [str(i) for i in range(50)],
        "correct": correct,
        "p_true": p_true or [0.2 + 0.6 * c for c in correct],
        "folds": 3,
        "fits": 3,
        "epoch_fraction": 0.34,
        "seed": 0,
        "accuracy": float(np.mean(correct)),
    }
    return save_checkpoint(out, model, meta.replace(selection_cv=cv))


@pytest.mark.parametrize(
    "scratch_right, full_right, verdict",
    [
        (20, 45, "transfer helped: full beats scratch"),
        (30, 32, "tie: full vs scratch"),
        (40, 20, "transfer did NOT help"),
    ],
)
def test_cross_validated_selection_says_helped_only_when_the_interval_excludes_0(
    scratch_right, full_right, verdict, tiny_prepared, source_model, tmp_path
) -> None:
    from tlpipe.fsio import read_json

    plain = tmp_path / "plain.pt"
    finetune.run(tiny_prepared, source_model, plain, _cfg("scratch", model="small_cnn"))
    models = {
        "scratch": _with_cv(
            plain, tmp_path / "scratch.pt", [1] * scratch_right + [0] * (50 - scratch_right)
        ),
        "full": _with_cv(plain, tmp_path / "full.pt", [1] * full_right + [0] * (50 - full_right)),
    }
    res = evaluate.run(tiny_prepared, models, tmp_path / "e", evaluate.EvaluateConfig())
    report = read_json(res.metrics_path)
    assert report["verdict"].startswith(verdict), report["verdict"]
    # on a tie scratch ships (evaluate.on_tie: baseline, the default): full is not shown to help
    assert report["selected"] == ("full" if verdict.startswith("transfer helped") else "scratch")
    assert report["transfer_helped"] is (verdict.startswith("transfer helped"))
    assert report["tie"] is verdict.startswith("tie")
    paired = report["paired"]
    lo, hi = paired["ci95"]
    # the default score: the probability of the true class (0.8 right, 0.2 wrong: _with_cv)
    assert lo <= paired["diff"] <= hi
    assert paired["diff"] == pytest.approx(0.6 * 2 * (full_right - scratch_right))
    assert paired["unit"] == "pt" and paired["score"] == "probability"
    assert (
        report["extra_fits"] == 6 and "3-fold stratified cross-validation" in report["selected_by"]
    )
    table = evaluate.format_table(report)
    assert "cv acc" in table and "selected (by CV)" in table and "6 extra fits" in table


@pytest.mark.parametrize("on_tie", ["baseline", "best"])
def test_on_a_tie_the_rule_in_params_says_what_ships(
    on_tie, tiny_prepared, source_model, tmp_path
) -> None:
    from tlpipe.fsio import read_json

    plain = tmp_path / "plain.pt"
    finetune.run(tiny_prepared, source_model, plain, _cfg("scratch", model="small_cnn"))
    models = {  # 32 vs 30 of 50 right: the interval includes 0
        "scratch": _with_cv(plain, tmp_path / "scratch.pt", [1] * 30 + [0] * 20),
        "full": _with_cv(plain, tmp_path / "full.pt", [1] * 32 + [0] * 18),
        "lp_ft": _with_cv(plain, tmp_path / "lp_ft.pt", [1] * 25 + [0] * 25),
    }
    cfg = evaluate.EvaluateConfig(plots=False, on_tie=on_tie)
    report = read_json(evaluate.run(tiny_prepared, models, tmp_path / "e", cfg).metrics_path)
    assert report["tie"] is True and report["transfer_helped"] is False
    assert report["selected"] == ("scratch" if on_tie == "baseline" else "full")
    assert f"evaluate.on_tie: {on_tie}" in report["verdict"]
    if on_tie == "best":
        assert "NOT shown to beat scratch" in report["verdict"]


def _unsure_scratch_confident_full(
    prepared: Path, source: Path, tmp_path: Path, full_right: int
) -> dict[str, Path]:
    """scratch: 30 of 50 right, barely (0.4 on the true class of 5), and confidently wrong
    (0.01) where wrong; full: `full_right` right, confidently (0.95), unsure (0.3) where
    wrong."""
    plain = tmp_path / "plain.pt"
    finetune.run(prepared, source, plain, _cfg("scratch", model="small_cnn"))
    scratch = [1] * 30 + [0] * 20
    full = [1] * full_right + [0] * (50 - full_right)
    return {
        "scratch": _with_cv(
            plain, tmp_path / "scratch.pt", scratch, [0.4 if c else 0.01 for c in scratch]
        ),
        "full": _with_cv(plain, tmp_path / "full.pt", full, [0.95 if c else 0.3 for c in full]),
    }


@pytest.mark.parametrize("select_by", ["accuracy", "probability", "log_likelihood"])
def test_select_by_says_which_per_image_score_chooses(
    select_by, tiny_prepared, source_model, tmp_path
) -> None:
    from tlpipe.fsio import read_json

    models = _unsure_scratch_confident_full(tiny_prepared, source_model, tmp_path, 28)
    full = [1] * 28 + [0] * 22
    cfg = evaluate.EvaluateConfig(plots=False, select_by=select_by, guard=None)
    out = tmp_path / "e"
    report = read_json(evaluate.run(tiny_prepared, models, out, cfg).metrics_path)
    assert report["selected"] == ("scratch" if select_by == "accuracy" else "full")
    paired = report["paired"]
    assert paired["score"] == select_by and paired["unit"] == (
        "nats" if "log" in select_by else "pt"
    )
    expected = {
        "accuracy": 100 * (28 - 30) / 50,
        "probability": 100 * ((28 * 0.95 + 22 * 0.3) - (30 * 0.4 + 20 * 0.01)) / 50,
        "log_likelihood": (
            28 * np.log(0.95) + 22 * np.log(0.3) - 30 * np.log(0.4) - 20 * np.log(0.01)
        )
        / 50,
    }[select_by]
    assert paired["diff"] == pytest.approx(expected, abs=1e-3)
    assert select_by.replace("_", " ") in report["verdict"]
    evidence = read_json(out / "evidence.json")  # what it chose from, image by image
    assert evidence["ids"] == [str(i) for i in range(50)]
    assert evidence["correct"]["full"] == full and evidence["p_true"]["scratch"][-1] == 0.01


@pytest.mark.parametrize("full_right", [28, 30])
def test_a_guard_keeps_a_transfer_that_loses_accuracy_from_shipping(
    full_right, tiny_prepared, source_model, tmp_path
) -> None:
    from tlpipe.fsio import read_json

    # full gives the true class far more probability than scratch (its interval excludes 0)
    # and is right on 28 (below scratch's 30: the guard stops it) or 30 of 50 (not below)
    models = _unsure_scratch_confident_full(tiny_prepared, source_model, tmp_path, full_right)
    cfg = evaluate.EvaluateConfig(plots=False, select_by="probability", guard="accuracy")
    report = read_json(evaluate.run(tiny_prepared, models, tmp_path / "e", cfg).metrics_path)
    assert report["paired"]["model"] == "full" and report["paired"]["ci95"][0] > 0
    if full_right < 30:
        assert report["selected"] == "scratch" and report["transfer_helped"] is False
        assert "below it in accuracy (-4.0 pt)" in report["verdict"]
        assert "evaluate.guard: accuracy" in report["verdict"]
    else:
        assert report["selected"] == "full" and report["transfer_helped"] is True
        assert report["verdict"].startswith("transfer helped: full beats scratch")


def test_paired_interval_of_identical_models_is_zero() -> None:
    assert evaluate.paired_interval(np.zeros(30)) == (0.0, 0.0, 0.0)
    mean, lo, hi = evaluate.paired_interval(np.r_[np.ones(10), np.zeros(40)])
    assert lo < mean == 0.2 < hi and lo > 0


# ---------------------------------------------------------------------------- cheaper to find out


def test_logme_ranks_informative_features_above_noise() -> None:
    from tlpipe.train.logme import logme

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    signal = np.eye(5)[y] @ rng.standard_normal((5, 32))
    noise = rng.standard_normal((300, 32))
    scores = [logme(signal + s * noise, y) for s in (0.1, 1.0, 10.0)]
    assert scores[0] > scores[1] > scores[2]
    assert logme(noise, y) < scores[1]


def test_logme_is_recorded_and_the_opt_in_skip_rule_skips(tiny_prepared, source_model, tmp_path):
    from tlpipe.fsio import read_json

    res = finetune.run(tiny_prepared, source_model, tmp_path / "lp.pt", _cfg("linear_probe"))
    meta = load_checkpoint(tmp_path / "lp.pt")[1]
    assert np.isfinite(res.metrics["logme"]) and meta.logme == res.metrics["logme"]
    # a "source model" that is a random init: its features cannot beat a random init's
    model, source_meta = load_checkpoint(source_model)
    with seeded(7):
        noise = build_model("small_cnn", len(source_meta.classes))
    save_checkpoint(tmp_path / "noise.pt", noise, source_meta)
    skipped = finetune.run(
        tiny_prepared, tmp_path / "noise.pt", tmp_path / "full.pt", _cfg("full", skip="logme")
    )
    assert skipped.metrics["skipped"] == 1.0 and skipped.metrics["skipped_epochs"] == 2
    assert "skipped: LogME of the source features" in skipped.summary
    models = {"scratch": tmp_path / "scratch.pt", "full": tmp_path / "full.pt"}
    finetune.run(tiny_prepared, source_model, models["scratch"], _cfg("scratch"))
    report = read_json(
        evaluate.run(tiny_prepared, models, tmp_path / "e", evaluate.EvaluateConfig()).metrics_path
    )
    assert report["selected"] == "scratch" and "every strategy was skipped" in report["verdict"]
    assert "LogME" in evaluate.format_table(report) and report["models"]["full"]["skipped"]


def test_validation_is_capped_to_a_fixed_subset() -> None:
    from tlpipe.train.loop import cap_validation

    x, y = np.arange(100)[:, None], np.arange(100) % 5
    a, b = cap_validation((x, y), 30, seed=0), cap_validation((x, y), 30, seed=0)
    assert len(a[1]) == 30 and np.array_equal(a[0], b[0]) and np.all(np.diff(a[0][:, 0]) > 0)
    assert cap_validation((x, y), 0, seed=0)[0] is x and cap_validation(None, 5, 0) is None
