"""Selective joint fine-tuning: the source stream, the loss, and `finetune --strategy joint`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import load_split
from tlpipe.errors import TlpipeError
from tlpipe.params.fields import build
from tlpipe.steps import finetune, match, pretrain
from tlpipe.train import joint
from tlpipe.train.loop import ArrayBatches
from tlpipe.train.models import build_model, load_checkpoint

TINY = {"epochs": 1, "batch_size": 16, "steps_per_epoch": 2, "lr": 0.05}


@pytest.fixture(scope="module")
def source_and_match(tiny_prepared: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A 1-epoch source model and its match output on `tiny_prepared`."""
    root = tmp_path_factory.mktemp("joint")
    cfg = build(
        pretrain.PretrainConfig, {"train": {**TINY, "batch_size": 32, "steps_per_epoch": 0}}
    )
    pretrain.run(tiny_prepared, root / "source.pt", cfg)
    mcfg = build(match.MatchConfig, {"plots": False, "discriminator": {"folds": 3}})
    match.run(tiny_prepared, root / "source.pt", root / "matching", mcfg)
    return root / "source.pt", root / "matching"


NO_CV = {"min_val": 0}  # these tests train the strategies; selection has its own tests


def _cfg(**joint_values) -> finetune.FinetuneConfig:
    values = {
        "strategy": "joint",
        "train": TINY,
        "probe": TINY,
        "joint": joint_values,
        "selection": NO_CV,
    }
    return build(finetune.FinetuneConfig, values)


def _specialist_cfg() -> finetune.FinetuneConfig:
    values = {
        "strategy": "specialist",
        "train": TINY,
        "specialist": {**TINY, "epochs": 2},
        "selection": NO_CV,
    }
    return build(finetune.FinetuneConfig, values)


def _stream(n: int = 40, weights=None, selected=None) -> joint.SourceStream:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (n, 1, 28, 28), dtype=np.uint8)
    w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    sel = np.arange(n // 2) if selected is None else np.asarray(selected)
    return joint.SourceStream(x, np.arange(n) % 5, w, sel, num_classes=5)


def _target() -> ArrayBatches:
    x = np.zeros((10, 1, 28, 28), np.uint8)
    return ArrayBatches(x, np.arange(10) % 5, batch_size=4, steps_per_epoch=3)


# ---------------------------------------------------------------------------- batches + loss


def test_joint_batches_concatenate_target_then_source() -> None:
    cfg = joint.JointConfig(sampling="weighted", source_batch_size=6)
    batches = joint.JointBatches(_target(), _stream(), cfg, seed=0)
    assert len(batches) == 3
    for batch in batches.epoch(0):
        assert batch["x"].shape == (10, 1, 28, 28)
        assert batch["domain"].tolist() == [0] * 4 + [1] * 6
        assert torch.all(batch["w"] == 1)  # weighted sampling: the loss is unweighted


def test_weighted_sampling_follows_the_weights_and_selected_stays_in_the_subset() -> None:
    w = np.full(40, 1e-4, np.float32)
    w[[3, 7]] = 20.0  # nearly all the mass
    stream = _stream(weights=w, selected=[1, 2])
    drawn = joint.JointBatches(_target(), stream, joint.JointConfig(sampling="weighted"), seed=0)
    assert set(drawn._draw(torch.Generator().manual_seed(0)).tolist()) <= {3, 7}
    sel = joint.JointBatches(_target(), stream, joint.JointConfig(sampling="selected"), seed=0)
    batch = next(iter(sel.epoch(0)))
    assert set(sel._draw(torch.Generator().manual_seed(0)).tolist()) <= {1, 2}
    assert torch.allclose(batch["w"][4:], torch.tensor(1e-4))  # loss weighted by w instead


def test_joint_loss_adds_the_weighted_source_term() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 3)
    joint.attach_source_head(
        model, {"head.weight": torch.zeros(5, 64), "head.bias": torch.zeros(5)}
    )
    batch = {
        "input": torch.randn(6, 1, 28, 28),
        "y": torch.tensor([0, 1, 2, 0, 1, 2]),
        "domain": torch.tensor([0, 0, 0, 1, 1, 1]),
        "w": torch.ones(6),
    }
    model.eval()
    target_only = joint.joint_loss(0.0)(model, batch)
    both = joint.joint_loss(0.5)(model, batch)
    assert both.item() == pytest.approx(target_only.item() + 0.5 * np.log(5), rel=1e-5)
    joint.detach_extra_heads(model)
    assert not any(k.startswith("source_head") for k in model.state_dict())


# ---------------------------------------------------------------------------- the strategy


@pytest.mark.parametrize("sampling", ["weighted", "selected"])
def test_joint_finetune_saves_a_plain_target_net(
    tiny_prepared: Path, source_and_match, tmp_path: Path, sampling: str
) -> None:
    source_model, match_dir = source_and_match
    out = tmp_path / "joint.pt"
    result = finetune.run(
        tiny_prepared, source_model, out, _cfg(sampling=sampling), match_dir=match_dir
    )
    model, meta = load_checkpoint(out)  # strict load: no source head left in the file
    assert meta.strategy == "joint"
    assert meta.classes == load_manifest(tiny_prepared).target_classes and meta.classes
    assert model.head.out_features == 5 and not hasattr(model, "source_head")
    test = load_split(tiny_prepared, "target_test")
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    assert 0 <= result.metrics["target_val_accuracy"] <= 1 and len(test) == 50
    src, _ = load_checkpoint(source_model)
    assert not torch.equal(src.backbone[0][0].weight, model.backbone[0][0].weight)


def test_joint_needs_a_matching_match_output(
    tiny_prepared: Path, source_and_match, tmp_path: Path, make_prepared
) -> None:
    source_model, match_dir = source_and_match
    with pytest.raises(TlpipeError, match="needs the output of `tlpipe match`"):
        finetune.run(tiny_prepared, source_model, tmp_path / "j.pt", _cfg())
    with pytest.raises(TlpipeError, match="weights.npy not found"):
        finetune.run(tiny_prepared, source_model, tmp_path / "j.pt", _cfg(), match_dir=tmp_path)
    other = make_prepared(seed=1)  # other prepared data: the weights are not for it
    with pytest.raises(TlpipeError, match="other prepared data"):
        finetune.run(other, source_model, tmp_path / "j.pt", _cfg(), match_dir=match_dir)
    assert not (tmp_path / "j.pt").exists()
    with pytest.raises(TlpipeError, match="source_weight"):
        _cfg(source_weight=-1)


# ------------------------------------------------------------------------------ specialist


def _match_with_selection(match_dir: Path, out: Path, selected: np.ndarray) -> Path:
    out.mkdir()
    for name in ("weights.npy", "report.json"):
        (out / name).write_bytes((match_dir / name).read_bytes())
    np.save(out / "selected.npy", selected)
    return out


def test_specialist_trains_on_the_selected_source_then_the_target(
    tiny_prepared: Path, source_and_match, tmp_path: Path
) -> None:
    source_model, match_dir = source_and_match
    source = load_split(tiny_prepared, "source")
    models = {}
    for name, sel in {
        "a": np.arange(0, len(source), 2),
        "a2": np.arange(0, len(source), 2),
        "b": np.arange(1, len(source), 2),
    }.items():
        md = _match_with_selection(match_dir, tmp_path / f"m_{name}", sel)
        res = finetune.run(
            tiny_prepared,
            source_model,
            tmp_path / f"{name}.pt",
            _specialist_cfg(),
            match_dir=md,
            checkpoint_dir=tmp_path / "ck",
        )
        models[name], meta = load_checkpoint(tmp_path / f"{name}.pt")
    phases = [(r["phase"], "val_accuracy" in r) for r in res.history]
    assert phases == [("specialist", False)] * 2 + [("full", True)]
    assert meta.strategy == "specialist" and not hasattr(models["b"], "source_head")
    assert 0 <= res.metrics["target_val_accuracy"] <= 1
    first = [m.backbone[0][0].weight for m in models.values()]
    assert torch.equal(first[0], first[1])  # same selection, same seed: the same model
    assert not torch.equal(first[0], first[2])  # the selection is what it trained on
    # the runner deletes them once the step's run is closed (tests/test_runner.py)
    assert {p.name for p in res.resume_files} == {"specialist.pt", "full.pt"}
    with pytest.raises(TlpipeError, match="'specialist' needs the output of `tlpipe match`"):
        finetune.run(tiny_prepared, source_model, tmp_path / "s.pt", _specialist_cfg())
