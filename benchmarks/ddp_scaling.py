"""Images/s of tlpipe's training loop in 1 and in 2 data-parallel processes (DDP, CPU, gloo).

    python benchmarks/ddp_scaling.py [--images 4096] [--batch-size 128] [--epochs 2]

The same `fit` call, on the same synthetic uint8 images with the same global batch, runs once
in this process and once in 2 processes started as torchrun would (RANK, WORLD_SIZE, …; each
rank its shard of every batch, BatchNorm synchronised). Images/s counts the global batches of
the epochs after the first (process start, the process group and the first epoch's warm-up
excluded). Last line: ``ddp scaling 2/1 = X`` (2 = perfect; on a 2-core machine that others
share, expect little). Results go to benchmarks/README.md with date, commit and command.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def train(images: int, batch_size: int, epochs: int, model_name: str) -> float:
    """Images/s of `fit` over epochs 2.. (this process: one rank, or one of several)."""
    from tlpipe.train.loop import ArrayBatches, TrainConfig, fit
    from tlpipe.train.models import build_model

    torch.set_num_threads(1)  # one core a process: 2 processes use what 2 threads would
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 1, 28, 28), np.uint8)
    y = rng.integers(0, 10, images)
    model = build_model(model_name, 10, seed=0)
    times: list[float] = []

    class Timed(ArrayBatches):  # the time at each epoch's first batch
        def batch(self, epoch: int, step: int):
            if step == 0:
                times.append(time.perf_counter())
            return super().batch(epoch, step)

    cfg = TrainConfig(epochs=epochs + 1, batch_size=batch_size, augment=True)
    batches = Timed(x, y, batch_size, seed=0)
    fit(model, batches, cfg, mean=[0.5], std=[0.25])
    seconds = time.perf_counter() - times[1]  # epochs 2.. (the loop ends right after training)
    return epochs * len(batches) * batch_size / seconds


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    speed = train(args.images, args.batch_size, args.epochs, args.model)
    Path(out, f"rank{rank}.json").write_text(json.dumps(speed))


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after a warm-up one)")
    p.add_argument("--model", default="small_cnn")
    args = p.parse_args(argv)
    print(
        f"cores {os.cpu_count()}, {args.images} images, global batch {args.batch_size}, "
        f"{args.model}, torch {torch.__version__}",
        flush=True,
    )
    one = train(args.images, args.batch_size, args.epochs, args.model)
    print(f"1 process:   {one:8.1f} images/s", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(port, args, out), nprocs=2, start_method="spawn")
        # the ranks step together: the slower one is the job's speed
        two = min(json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2))
    print(f"2 processes: {two:8.1f} images/s", flush=True)
    print(f"ddp scaling 2/1 = {two / one:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
