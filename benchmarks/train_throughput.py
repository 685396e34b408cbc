"""Images/s of tlpipe's training loop vs a bare PyTorch loop, same model, data and batches.

    python benchmarks/train_throughput.py [--images 8192] [--repeats 3] [--model small_cnn]

Both loops train the same architecture from the same initial weights on the same uint8
Fashion-MNIST images (synthetic if the Debian package is missing), with SGD+Nesterov and a
one-cycle schedule, normalising on the fly. The two are run alternately `--repeats` times and
the median images/s of each is compared. Goal: ratio (tlpipe / bare) ≥ 0.9.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tlpipe.train.loop import ArrayBatches, TrainConfig, fit, to_input
from tlpipe.train.models import build_model

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = [0.286], [0.353]


def load_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    if (FMNIST / "train-images-idx3-ubyte.gz").exists():
        from tlpipe.data.readers import read_idx

        x = read_idx(FMNIST / "train-images-idx3-ubyte.gz")[:n, None].copy()  # writable
        y = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")[:n].astype(np.int64)
        return x, y, "Fashion-MNIST"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 1, 28, 28), np.uint8), rng.integers(0, 10, n), "synthetic"


def bare_loop(model, x, y, cfg: TrainConfig) -> float:
    """The reference: what a person would write by hand, minus nothing essential."""
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )
    steps = len(x) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    model.train()
    t0 = time.perf_counter()
    order = torch.randperm(len(x))
    for i in range(steps):
        idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        loss = F.cross_entropy(model(to_input(xs[idx], MEAN, STD)), ys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def tlpipe_loop(model, x, y, cfg: TrainConfig) -> float:
    steps = len(x) // cfg.batch_size
    batches = ArrayBatches(x, y, cfg.batch_size, steps_per_epoch=steps)
    result = fit(model, batches, cfg, mean=MEAN, std=STD)
    return steps * cfg.batch_size / result.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="small_cnn")
    args = ap.parse_args()
    x, y, source = load_images(args.images)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, schedule="onecycle")
    torch.manual_seed(0)
    init = build_model(args.model, 10)
    bare_loop(copy.deepcopy(init), x[:1024], y[:1024], cfg)  # warm-up (allocator, kernels)
    ours, bare = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(copy.deepcopy(init), x, y, cfg))
        ours.append(tlpipe_loop(copy.deepcopy(init), x, y, cfg))
    o, b = statistics.median(ours), statistics.median(bare)
    threads = torch.get_num_threads()
    print(
        f"model {args.model}, {len(x)} {source} images/epoch, batch {args.batch_size}, "
        f"{threads} threads, {args.repeats} alternating repeats (median)"
    )
    print("| loop | images/s |\n|---|---|")
    print(f"| bare PyTorch | {b:,.0f} |\n| tlpipe `fit` | {o:,.0f} |")
    print(f"ratio tlpipe/bare = {o / b:.3f}  (goal ≥ 0.9)")


if __name__ == "__main__":
    main()
