"""Data-parallel training (tlpipe.train.distributed): two ranks train what one process trains.

Parity is checked in float64 (torch's default dtype set by the test, or `TLPIPE_FLOAT64=1` for
the CLI): in float32 a rounding difference of 1e-7 (another summation order: synchronised
BatchNorm, the gradient all-reduce, or merely another thread count in one process) grows in
the pretrain recipe (lr 0.1, small_cnn) to weight differences of 1e-2 within 10 steps
(measured), so a float32 comparison would measure that, not DDP's correctness.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import load_split
from tlpipe.params import JointConfig, TrainConfig
from tlpipe.train.joint import JointBatches, SourceStream, attach_source_head, joint_loss
from tlpipe.train.loop import ArrayBatches, cross_entropy, fit
from tlpipe.train.models import build_model, load_checkpoint


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

    fit(model, batches, cfg, mean=m.mean, std=m.std, loss_fn=counted)
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


# ---------------------------------------------------------------------------- torchrun, the CLI


def _torchrun(work: Path, *args: str, procs: int = 2, **popen) -> subprocess.Popen:
    """`torchrun --nproc_per_node=2 -m tlpipe …` in float64 (`TLPIPE_FLOAT64`) in `work`;
    procs=1: no launcher."""
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    run += [f"--master_port={_free_port()}"]
    cmd = [*(run if procs == 2 else [sys.executable]), "-m", "tlpipe", *args, "-p", "none.yaml"]
    env = {**popen.pop("env", os.environ), "TLPIPE_FLOAT64": "1"}
    return subprocess.Popen(
        cmd,
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants at once (torchrun starts each worker in its own
    session, so its process group is not enough): a node lost mid-epoch."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _ok(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _same(a: Path, b: Path) -> None:
    wa, wb = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].double(), wb[k].double(), rtol=0, atol=1e-9), k


PRETRAIN = ["--set", "pretrain.train.epochs=6", "--set", "pretrain.train.batch_size=32"]
FINETUNE = [
    f"--set=finetune.{section}.{key}={value}"
    for section, key, value in [
        ("train", "epochs", 2),
        ("probe", "epochs", 1),
        ("train", "steps_per_epoch", 3),
        ("probe", "steps_per_epoch", 3),
    ]
]


@pytest.mark.slow
def test_torchrun_pretrain_and_finetune_match_one_process_and_resume_after_a_kill(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    prep = ["--prepared", str(tiny_prepared)]
    one = ["pretrain", *prep, "--out", "one/source.pt", "--no-track", *PRETRAIN]
    _ok(_torchrun(tmp_path, *one, procs=1))

    # 2 processes, killed (SIGKILL, the whole group) once the first epoch's resume file exists
    two = ["pretrain", *prep, "--out", "two/source.pt", "--checkpoints", "two/ck", "--no-track"]
    proc = _torchrun(tmp_path, *two, *PRETRAIN)
    resume_file = tmp_path / "two/ck/pretrain.resume.pt"
    deadline = time.monotonic() + 300
    while not resume_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    _kill_tree(proc.pid)
    killed, _ = proc.communicate()
    assert resume_file.exists() and not (tmp_path / "two/source.pt").exists(), killed[-3000:]
    out = _ok(_torchrun(tmp_path, *two, *PRETRAIN))
    assert "pretrain: resuming after epoch" in out
    assert "rank 0/2 trains" in out and "rank 1/2 trains" in out
    _same(tmp_path / "one/source.pt", tmp_path / "two/source.pt")
    # rank 0 alone wrote: the model, its resume file removed; nothing of rank 1's anywhere
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    one_process = ["checkpoints", "checkpoints/pretrain", "one", "one/source.pt"]
    assert written == [*one_process, "two", "two/ck", "two/source.pt"]
    assert out.count("wrote two/source.pt") == 1 and "tlpipe-replica" not in out

    # a fine-tune (lp_ft: a frozen-BatchNorm phase, then all layers), tracked by rank 0 alone
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    ft = ["finetune", *prep, "--strategy", "lp_ft", "--source", "one/source.pt", *FINETUNE]
    _ok(_torchrun(tmp_path, *ft, "--out", "ft1.pt", "--no-track", procs=1))
    _ok(_torchrun(tmp_path, *ft, "--out", "ft2.pt", env=env))
    _same(tmp_path / "ft1.pt", tmp_path / "ft2.pt")
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_name for r in runs] == ["finetune:lp_ft"]

    # the solved linear probe: every rank solves the same regression, rank 0 writes it
    lp = [
        "finetune",
        *prep,
        "--strategy",
        "linear_probe",
        "--source",
        "one/source.pt",
        "--no-track",
    ]
    _ok(_torchrun(tmp_path, *lp, "--out", "lp1.pt", procs=1))
    out = _ok(_torchrun(tmp_path, *lp, "--out", "lp2.pt"))
    _same(tmp_path / "lp1.pt", tmp_path / "lp2.pt")
    cv_fits = load_checkpoint(tmp_path / "lp2.pt")[1].selection_cv["fits"]  # the params' folds
    assert out.count("logistic regression on") == 1 + cv_fits, out[-2000:]  # only rank 0 says
