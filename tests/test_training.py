"""The one training loop: learning, determinism, resume after a kill, NaN handling."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tlpipe import runner
from tlpipe.data.loader import augment
from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import load_split
from tlpipe.errors import TlpipeError
from tlpipe.params.learning import Augment, ColorJitter, RandomResizedCrop
from tlpipe.train.loop import ArrayBatches, TrainConfig, accuracy, augment_batch, fit, predict
from tlpipe.train.models import build_model

FAST = TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=0)


def _source(prepared: Path):
    m = load_manifest(prepared)
    return m, load_split(prepared, "source"), load_split(prepared, "source_val")


def test_fit_learns_and_keeps_best_val_epoch(tiny_prepared: Path) -> None:
    m, src, val = _source(tiny_prepared)
    torch.manual_seed(0)
    model = build_model("small_cnn", 5)
    before = accuracy(model, src.x, src.y, mean=m.mean, std=m.std)
    batches = ArrayBatches(src.x, src.y, 32, seed=0, steps_per_epoch=10)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05)
    res = fit(model, batches, cfg, mean=m.mean, std=m.std, val=(val.x, val.y))
    after = accuracy(model, src.x, src.y, mean=m.mean, std=m.std)
    assert after > max(before, 0.6)
    assert len(res.history) == 4
    best = max(r["val_accuracy"] for r in res.history)
    assert res.best_val_accuracy == best
    assert accuracy(model, val.x, val.y, mean=m.mean, std=m.std) == pytest.approx(best)


def test_batches_are_deterministic_per_epoch_and_cycle() -> None:
    x = np.zeros((10, 1, 4, 4), np.uint8)
    y = np.arange(10)
    b = ArrayBatches(x, y, batch_size=4, seed=3, steps_per_epoch=7)
    assert len(b) == 7
    e0 = [batch["y"].tolist() for batch in b.epoch(0)]
    assert e0 == [batch["y"].tolist() for batch in b.epoch(0)]
    assert e0 != [batch["y"].tolist() for batch in b.epoch(1)]
    assert sum(len(ys) for ys in e0) == 28  # cycles through the data ~3 times
    assert ArrayBatches(x, y, batch_size=4).steps == 3  # one pass by default


def test_augment_keeps_shape_dtype_and_content() -> None:
    x = torch.zeros((8, 1, 28, 28), dtype=torch.uint8)
    x[:, :, 10:18, 10:18] = 200
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out.float().sum((1, 2, 3)) == 64 * 200).all()  # a shift by ≤ 2 px loses nothing here


def _augment_before_params(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`augment: true` as it was before augmentation had parameters (2 px shift + flip)."""
    pad, (n, _, h, w) = 2, x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [28, 96])  # one gather for small images, copies for large
def test_the_default_augmentation_is_the_one_before_params_bit_for_bit(size: int) -> None:
    x = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8)
    for seed in range(4):
        want = _augment_before_params(x, torch.Generator().manual_seed(seed))
        assert torch.equal(augment(x, Augment(), seed), want)
    flipped = augment(x, Augment(pad_crop=0, hflip=True), seed=1)
    same = [torch.equal(a, b) for a, b in zip(flipped, x, strict=True)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(same) and any(mirrored)


def test_v2_augmentation_depends_only_on_its_seed() -> None:
    cfg = Augment(RandomResizedCrop(scale=(0.2, 0.5)), ColorJitter(0.5, 0.5, 0.5, 0.1), pad_crop=0)
    for channels in (3, 1):
        x = torch.randint(0, 256, (6, channels, 40, 40), dtype=torch.uint8)
        torch.manual_seed(123)
        before = torch.random.get_rng_state()
        a = augment(x, cfg, seed=7)
        assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG untouched
        assert torch.equal(a, augment(x, cfg, seed=7)) and not torch.equal(a, augment(x, cfg, 8))
        assert a.shape == x.shape and a.dtype == torch.uint8 and not torch.equal(a, x)


def test_augment_params_take_a_section_or_true_false() -> None:
    from tlpipe.params.resolver import resolve

    def augment_of(values: dict, section: str = "pretrain") -> Augment:
        return resolve({section: {"train": {"augment": values}}})[section].train.augment

    assert augment_of(True) == Augment() == resolve({})["pretrain"].train.augment
    assert augment_of(False) == Augment(pad_crop=0, hflip=False) == TrainConfig().augment
    rrc = augment_of({"random_resized_crop": {"scale": [0.5, 1]}, "pad_crop": 0}, "finetune")
    assert rrc == Augment(RandomResizedCrop(scale=(0.5, 1.0)), pad_crop=0, hflip=True)
    assert resolve({}, ["finetune.train.augment.hflip=false"])["finetune"].train.augment == (
        Augment(pad_crop=2, hflip=False)
    )  # a partial section keeps the other defaults
    bad = {
        "augment.pad_crop = -1 is out of range: it must be >= 0": {"pad_crop": -1},
        "scale": {"random_resized_crop": {"scale": [0.5, 2]}},
        r"color_jitter.hue = 0.9 is out of range: it must be in \[0, 0.5\]": {
            "color_jitter": {"hue": 0.9}
        },
        "unknown parameter.*augment.flip": {"flip": True},
    }
    for message, values in bad.items():
        with pytest.raises(TlpipeError, match=message):
            augment_of(values)


def test_nan_loss_stops_with_clear_error(tiny_prepared: Path) -> None:
    m, src, _ = _source(tiny_prepared)
    model = build_model("small_cnn", 5)
    batches = ArrayBatches(src.x, src.y, 32)
    with pytest.raises(TlpipeError, match="NaN/inf.*lower the learning rate"):
        fit(
            model, batches, FAST, mean=m.mean, std=m.std, penalty=lambda: torch.tensor(float("nan"))
        )


def test_everything_frozen_is_an_error(tiny_prepared: Path) -> None:
    m, src, _ = _source(tiny_prepared)
    model = build_model("small_cnn", 5)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TlpipeError, match="every parameter is frozen"):
        fit(model, ArrayBatches(src.x, src.y, 32), FAST, mean=m.mean, std=m.std)


def test_bad_train_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


KILLER = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    from tlpipe.data.manifest import load_manifest
    from tlpipe.data.prepared import load_split
    from tlpipe.train.models import build_model
    from tlpipe.train.loop import ArrayBatches, TrainConfig, fit

    prepared, ckpt, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    die_at, limit = int(sys.argv[4]), float(sys.argv[5])
    m = load_manifest(prepared)
    src, val = load_split(prepared, "source"), load_split(prepared, "source_val")
    torch.manual_seed(0)
    model = build_model("small_cnn", 5)
    steps = [0]

    def die_midway():  # the process is killed (no cleanup at all) in the middle of epoch 3
        steps[0] += 1
        if steps[0] == die_at:
            os._exit(9)
        return torch.zeros(())

    cfg = TrainConfig(epochs=4, batch_size=32, steps_per_epoch=5, augment=True, seed=1,
                      max_in_memory_mb=limit, num_workers=2)
    res = fit(model, ArrayBatches(src.x, src.y, 32, seed=1, steps_per_epoch=5), cfg,
              mean=m.mean, std=m.std, val=(val.x, val.y), penalty=die_midway,
              checkpoint=ckpt)
    torch.save({"state": model.state_dict(), "resumed_from": res.resumed_from,
                "epochs": len(res.history)}, out)
    """
)


@pytest.mark.parametrize("limit_mb", [1024.0, 0.0], ids=["in_memory", "streamed"])
def test_resume_after_kill_matches_uninterrupted_run(
    tiny_prepared: Path, tmp_path: Path, limit_mb: float
) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)

    def go(ckpt: str, out: str, die_at: int) -> int:
        args = [
            sys.executable,
            str(script),
            str(tiny_prepared),
            str(tmp_path / ckpt),
            str(tmp_path / out),
            str(die_at),
            str(limit_mb),
        ]
        return subprocess.run(args, capture_output=True, timeout=120).returncode

    assert go("a.pt", "never.pt", die_at=13) == 9  # killed during epoch 3 of 4
    assert (tmp_path / "a.pt").exists() and not (tmp_path / "never.pt").exists()
    assert go("a.pt", "resumed.pt", die_at=-1) == 0  # same command again: resumes
    assert go("b.pt", "straight.pt", die_at=-1) == 0  # reference: never interrupted
    resumed = torch.load(tmp_path / "resumed.pt")
    straight = torch.load(tmp_path / "straight.pt")
    assert resumed["resumed_from"] == 2 and resumed["epochs"] == 4
    for k, v in straight["state"].items():
        assert torch.equal(resumed["state"][k], v), k  # bit-identical


def test_a_stale_resume_file_is_not_resumed_and_a_finished_step_removes_its_own(
    tiny_prepared: Path, tmp_path: Path, capsys
) -> None:
    """A re-run after a params change (`dvc repro`) must train afresh, not reload old epochs."""
    from tlpipe.params.fields import build
    from tlpipe.steps import pretrain

    m, src = load_manifest(tiny_prepared), load_split(tiny_prepared, "source")
    ckpt = tmp_path / "ck.pt"

    def run(lr: float, key: str = "") -> int:
        cfg = TrainConfig(epochs=2, batch_size=32, steps_per_epoch=2, lr=lr)
        batches = ArrayBatches(src.x, src.y, 32, steps_per_epoch=2)
        res = fit(
            build_model("small_cnn", 5),
            batches,
            cfg,
            mean=m.mean,
            std=m.std,
            checkpoint=ckpt,
            resume_key=key,
        )
        return res.resumed_from

    assert run(0.05) == 0 and ckpt.exists()  # a finished fit keeps its file...
    assert run(0.05) == 2  # ...so the same settings resume (nothing left to do)
    assert run(0.01) == 0  # other settings: start over
    assert "written with other settings" in capsys.readouterr().err
    assert run(0.01, key="other data") == 0
    # a whole step run deletes its resume files once the model is written
    cfg = build(pretrain.PretrainConfig, {"train": {"epochs": 1, "steps_per_epoch": 2}})
    runner.run_step(
        "pretrain",
        {"pretrain": cfg},
        track=False,
        prepared_dir=tiny_prepared,
        out_model=tmp_path / "source.pt",
        checkpoint_dir=tmp_path / "ck",
    )
    assert (tmp_path / "source.pt").exists() and not list((tmp_path / "ck").iterdir())


def test_predict_handles_empty_and_batches(tiny_prepared: Path) -> None:
    m, src, _ = _source(tiny_prepared)
    model = build_model("small_cnn", 5)
    full = predict(model, src.x[:50], m.mean, m.std, batch_size=512)
    chunked = predict(model, src.x[:50], m.mean, m.std, batch_size=7)
    np.testing.assert_allclose(full, chunked, atol=1e-5)
    assert predict(model, src.x[:0], m.mean, m.std).shape == (0, 5)
