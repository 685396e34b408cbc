"""Data-parallel training (tlpipe.train.distributed): two ranks train what one process trains.

Parity is checked in float64 (torch's default dtype set by the test): in float32 torch's own
CPU BatchNorm rounds its sums differently from any synchronised BatchNorm, so a float32
comparison would measure BatchNorm's rounding, not DDP's correctness.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch

from tlpipe.data.prepared import load_manifest, load_split
from tlpipe.params import JointConfig, TrainConfig
from tlpipe.train.joint import JointBatches, SourceStream, attach_source_head, joint_loss
from tlpipe.train.loop import ArrayBatches, cross_entropy, fit
from tlpipe.train.models import build_model

F64 = "import torch; torch.set_default_dtype(torch.float64)\nfrom tlpipe.cli import main\nmain()\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(prepared: str, kind: str) -> dict[str, np.ndarray]:
    """One `fit` on the tiny data (float64); the trained weights and the rows the loss saw."""
    torch.set_default_dtype(torch.float64)
    m, src = load_manifest(prepared), load_split(prepared, "source")
    model = build_model("small_cnn", 5, seed=0)
    # streamed from disk (max_in_memory_mb=0): the route that shards inside the loader
    cfg = TrainConfig(
        epochs=2, batch_size=16, steps_per_epoch=3, augment=True, max_in_memory_mb=0, num_workers=0
    )
    batches = ArrayBatches(src.x, src.y, 16, seed=0, steps_per_epoch=3)
    loss_fn = cross_entropy()
    if kind == "joint":  # target and source rows in one batch, a second head: DDP sees both
        state = {k: v.clone() for k, v in model.state_dict().items()}
        attach_source_head(model, state)
        n = len(src.y)
        stream = SourceStream(src.x, src.y, np.ones(n, np.float32), np.arange(n), 5)
        batches = JointBatches(batches, stream, JointConfig(sampling="weighted"), seed=0)
        loss_fn = joint_loss(1.0)
    rows = []

    def counted(model, batch):
        rows.append(len(batch["y"]))
        return loss_fn(model, batch)

    fit(model, batches, cfg, mean=m["mean"], std=m["std"], loss_fn=counted)
    return {"rows": np.array(sum(rows)), **{k: v.numpy() for k, v in model.state_dict().items()}}


def _rank(rank: int, port: int, prepared: str, out: str) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    for kind in KINDS:
        np.savez(f"{out}/{kind}{rank}.npz", **_fit(prepared, kind))


KINDS = ("plain", "joint")  # joint: target + source rows in one batch, through a second head


def test_two_ranks_train_the_weights_of_one_process(tiny_prepared: Path, tmp_path) -> None:
    import torch.multiprocessing as mp

    before = torch.get_default_dtype()
    try:
        one = {kind: _fit(str(tiny_prepared), kind) for kind in KINDS}
    finally:
        torch.set_default_dtype(before)
    args = (_free_port(), str(tiny_prepared), str(tmp_path))
    mp.start_processes(_rank, args=args, nprocs=2, start_method="spawn")
    initial = build_model("small_cnn", 5, seed=0).state_dict()["head.weight"].numpy()
    for kind in KINDS:
        ranks = [np.load(tmp_path / f"{kind}{r}.npz") for r in range(2)]
        for r in ranks:  # each rank's loss saw its half of every batch
            assert 2 * r["rows"] == one[kind]["rows"]
        for key in one[kind].keys() - {"rows"}:
            for got in ranks:
                np.testing.assert_allclose(got[key], one[kind][key], rtol=0, atol=1e-9, err_msg=key)
        assert np.abs(ranks[0]["head.weight"] - initial).max() > 1e-3  # it did train
