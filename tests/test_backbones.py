"""Pretrained torchvision backbones: by name, weights from the torch cache or a file, grey/RGB
stems, the weights' normalisation in every checkpoint, and a scenario with no source dataset."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tlpipe.data.manifest import Manifest, Side, SplitRecord, write_manifest
from tlpipe.data.prepared import Split, save_split
from tlpipe.errors import TlpipeError
from tlpipe.fsio import read_json
from tlpipe.params.fields import build
from tlpipe.steps import finetune, match, pretrain
from tlpipe.train.checkpoint import CheckpointMeta
from tlpipe.train.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)

TINY = {"epochs": 1, "batch_size": 8, "steps_per_epoch": 2, "lr": 0.01}
GREY_MEAN = [sum(IMAGENET_MEAN) / 3]


def _prepared(root: Path, channels: int = 1, size: int = 28, source: bool = True) -> Path:
    """A prepared dir made by hand: 2 source classes (or none), 3 target classes."""
    rng = np.random.default_rng(0)

    def split(n: int, classes: int) -> Split:
        x = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
        return Split(x=x, y=np.arange(n) % max(classes, 1), shifted=np.zeros(n, bool))

    root.mkdir(parents=True)
    n_source = 16 if source else 0
    sizes = {"source": n_source, "source_val": n_source // 4, "target_train": 9}
    records = {}
    for name, n in {**sizes, "target_val": 6, "target_test": 6}.items():
        classes = 2 if name.startswith("source") else 3
        data = split(n, classes)
        save_split(root, name, data)
        per_class = tuple(np.bincount(data.y, minlength=classes).tolist()) if n else (0,) * classes
        records[name] = SplitRecord(count=n, sha256=f"hand-made-{name}", per_class=per_class)
    version = f"hand-made-{channels}-{size}-{source}"
    manifest = Manifest(
        dataset="mine",
        one_dataset=False,
        source=Side(dataset="theirs", format="npz") if source else None,
        target=Side(dataset="mine", format="npz"),
        scenario={},
        source_classes=("a", "b") if source else (),
        target_classes=("x", "y", "z"),
        input_shape=(channels, size, size),
        mean=(0.3,) * channels,
        std=(0.2,) * channels,
        splits=records,
        dataset_sha256=version,
    )
    write_manifest(root, manifest, version)
    return root


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache ($TORCH_HOME), and no network: downloads fail at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens on the discard port
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # rebuilt with these proxies
    return tmp_path / "torch"


def _cache_weights(torch_home: Path, model: str) -> dict[str, torch.Tensor]:
    """Put randomly initialised torchvision weights where torchvision looks for `model`'s."""
    from torchvision.models import get_model, get_model_weights

    state = get_model(model, weights=None).state_dict()
    name = get_model_weights(model).DEFAULT.url.rsplit("/", 1)[1]
    (torch_home / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(state, torch_home / "hub" / "checkpoints" / name)
    return state


# ---------------------------------------------------------------------------- weights


def test_imagenet_weights_come_from_the_torch_cache(torch_home: Path) -> None:
    state = _cache_weights(torch_home, "mobilenet_v3_small")
    weights = load_weights("mobilenet_v3_small", "imagenet")
    assert weights.origin == "torchvision mobilenet_v3_small IMAGENET1K_V1"
    assert weights.normalisation(3) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert weights.normalisation(1)[0] == pytest.approx(GREY_MEAN)
    net = build_model(
        "mobilenet_v3_small", 5, in_chans=3, input_size=64, pretrained="IMAGENET1K_V1"
    )
    torch.testing.assert_close(net.blocks()[0][0].weight, state["features.0.0.weight"])
    torch.testing.assert_close(
        net.blocks()[5].block[0][0].weight, state["features.5.block.0.0.weight"]
    )
    grey = build_model("mobilenet_v3_small", 5, in_chans=1, input_size=28, pretrained=weights)
    stem = state["features.0.0.weight"].sum(1, keepdim=True)  # a 3×3 stem at stride 1: loaded
    torch.testing.assert_close(grey.blocks()[0][0].weight, stem)


def test_weights_missing_from_the_cache_offline_fail_in_one_line(torch_home: Path) -> None:
    from torchvision.models import MobileNet_V3_Small_Weights

    url = MobileNet_V3_Small_Weights.DEFAULT.url
    cached = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    with pytest.raises(TlpipeError) as err:
        build_model("mobilenet_v3_small", 5, in_chans=3, input_size=64, pretrained="imagenet")
    message = str(err.value)
    assert f"download {url} to {cached}" in message and "\n" not in message
    assert not cached.exists() and not list(cached.parent.glob("*"))  # no partial download


def test_bad_weights_are_clear_errors(torch_home: Path, tmp_path: Path) -> None:
    with pytest.raises(TlpipeError, match="unknown weights 'IMAGENET1K_V9' for resnet50.*V2"):
        load_weights("resnet50", "IMAGENET1K_V9")
    with pytest.raises(TlpipeError, match="small_cnn has no torchvision weights"):
        load_weights("small_cnn", "imagenet")
    with pytest.raises(TlpipeError, match="not found"):
        load_weights("resnet18", tmp_path / "resnet18-f37072fd.pth")
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(TlpipeError, match="are they for another model"):
        build_model("mobilenet_v3_small", 5, pretrained=tmp_path / "r18.pth")
    with pytest.raises(TlpipeError, match="small_cnn is not a torchvision model"):
        build_model("small_cnn", 5, pretrained=tmp_path / "r18.pth")


# ---------------------------------------------------------------------------- channels


def test_rgb_weights_feed_a_grey_stem_and_grey_weights_an_rgb_one(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    rgb = resnet18().state_dict()
    torch.save(rgb, tmp_path / "r18.pth")
    grey = build_model("resnet18", 5, in_chans=1, input_size=224, pretrained=tmp_path / "r18.pth")
    torch.testing.assert_close(grey.blocks()[0][0].weight, rgb["conv1.weight"].sum(1, keepdim=True))

    # a grey tlpipe model → RGB: the same image in grey or as RGB gives the same logits
    source = build_model("small_cnn", 4, in_chans=1, seed=3).eval()
    meta = CheckpointMeta(
        arch="small_cnn", in_chans=1, input_size=28, classes=tuple("abcd"), mean=(0.3,), std=(0.2,)
    )
    save_checkpoint(tmp_path / "grey.pt", source, meta)
    weights = load_weights("small_cnn", tmp_path / "grey.pt")
    assert weights.normalisation(3) == ([0.3] * 3, [0.2] * 3)
    net = build_model("small_cnn", 4, in_chans=3, pretrained=weights).eval()
    net.head.load_state_dict(source.head.state_dict())
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        as_rgb, as_grey = net((x.expand(-1, 3, -1, -1) - 0.3) / 0.2), source((x - 0.3) / 0.2)
    torch.testing.assert_close(as_rgb, as_grey, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_families_at_small_and_full_size(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no compute
        small = build_model(name, 3, in_chans=1, input_size=28)
        assert small(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
        full = build_model(name, 3, in_chans=3, input_size=224)
        assert full.backbone(torch.zeros(2, 3, 224, 224)).shape == (2, full.feat_dim)
    assert len(small.blocks()) >= 5 and small.feat_dim == full.feat_dim


# ---------------------------------------------------------------------------- steps


def test_pretrain_and_finetune_keep_the_weights_normalisation(torch_home, tmp_path) -> None:
    _cache_weights(torch_home, "mobilenet_v3_small")
    prepared = _prepared(tmp_path / "rgb", channels=3, size=32)
    values = {"model": "mobilenet_v3_small", "pretrained": "imagenet", "train": TINY}
    cfg = build(pretrain.PretrainConfig, values)
    pretrain.run(prepared, tmp_path / "source.pt", cfg)
    _, meta = load_checkpoint(tmp_path / "source.pt")
    assert (meta.mean, meta.std) == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    assert meta.pretrained == "torchvision mobilenet_v3_small IMAGENET1K_V1"
    for strategy, mean in (("linear_probe", list(IMAGENET_MEAN)), ("scratch", [0.3] * 3)):
        out = tmp_path / f"{strategy}.pt"
        ft = build(finetune.FinetuneConfig, {"strategy": strategy, "train": TINY, "probe": TINY})
        finetune.run(prepared, tmp_path / "source.pt", out, ft)
        assert list(load_checkpoint(out)[1].mean) == mean  # what export and the edge runtime use


@pytest.fixture(scope="module")
def no_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A scenario without source data, and its source model: a grey tlpipe backbone file."""
    root = tmp_path_factory.mktemp("no_source")
    prepared = _prepared(root / "prepared", source=False)
    backbone = build_model("small_cnn", 7, seed=5)
    meta = CheckpointMeta(
        arch="small_cnn",
        in_chans=1,
        input_size=28,
        classes=tuple("abcdefg"),
        mean=(0.4,),
        std=(0.3,),
    )
    save_checkpoint(root / "backbone.pt", backbone, meta)
    cfg = build(pretrain.PretrainConfig, {"pretrained": str(root / "backbone.pt")})
    result = pretrain.run(prepared, root / "source.pt", cfg)
    assert "no source dataset" in result.summary and not result.history
    return prepared, root / "source.pt"


def test_no_source_pretrain_writes_the_backbone(no_source, tmp_path) -> None:
    prepared, source_model = no_source
    net, meta = load_checkpoint(source_model)
    assert meta.num_classes == 0 and meta.strategy == "backbone"
    assert (meta.mean, meta.std) == ((0.4,), (0.3,))  # the backbone's own, not the data's
    backbone, _ = load_checkpoint(source_model.parent / "backbone.pt")
    for key, value in backbone.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[key], value), key
    with pytest.raises(TlpipeError, match="^no source dataset and no pretrained backbone: nothing"):
        pretrain.run(prepared, tmp_path / "x.pt", pretrain.PretrainConfig())
    assert not (tmp_path / "x.pt").exists()


def test_no_source_match_writes_a_skipped_report(no_source, tmp_path) -> None:
    prepared, source_model = no_source
    result = match.run(prepared, source_model, tmp_path / "matching", match.MatchConfig())
    assert "matching skipped" in result.summary
    assert np.load(result.weights).shape == np.load(result.selected).shape == (0,)
    assert "no source dataset" in read_json(result.report)["skipped"]


@pytest.mark.parametrize("strategy", ["linear_probe", "partial", "full", "lp_ft"])
def test_no_source_finetunes_from_the_backbone(no_source, tmp_path, strategy) -> None:
    prepared, source_model = no_source
    cfg = build(finetune.FinetuneConfig, {"strategy": strategy, "train": TINY, "probe": TINY})
    result = finetune.run(prepared, source_model, tmp_path / "m.pt", cfg)
    tuned, meta = load_checkpoint(result.model_path)
    assert meta.classes == ("x", "y", "z") and meta.mean == (0.4,)
    if strategy == "linear_probe":
        source, _ = load_checkpoint(source_model)
        for key, value in source.backbone.state_dict().items():
            assert torch.equal(tuned.backbone.state_dict()[key], value), key


@pytest.mark.parametrize("strategy", ["joint", "specialist"])
def test_no_source_joint_and_specialist_fail_at_once(no_source, tmp_path, strategy) -> None:
    prepared, source_model = no_source
    cfg = build(finetune.FinetuneConfig, {"strategy": strategy, "train": TINY})
    with pytest.raises(TlpipeError, match=f"strategy '{strategy}' needs a source dataset"):
        finetune.run(prepared, source_model, tmp_path / "m.pt", cfg, match_dir=tmp_path)
