"""Fine-tune images/s through tlpipe's streaming loader vs synthetic tensors already on the device.

    python benchmarks/gpu_loader.py [--images 4096] [--steps 40] [--batch 128] [--workers 4]
                                    [--repeats 3]
    python benchmarks/gpu_loader.py --quick      # tiny, runs on a CPU (the test does this)

Both sides train resnet18 at 224 px (3 channels) with the same optimizer through the same
`tlpipe.train.loop.fit` step (bf16 autocast and channels_last on CUDA). tlpipe's side reads a
prepared split from disk (memory-mapped, streamed: `max_in_memory_mb=0`; on CUDA `--workers`
reader threads, on a CPU worker processes, as `Feed` picks them) with augmentation on; the
ceiling's batches are uint8 tensors already on the device (no loader at all), augmented and
normalised there. After a warm-up the two are
measured alternately `--repeats` times and the medians compared: the ratio tlpipe / ceiling
says how much the loader costs; goal ≥ 0.8 on a GPU. On a CPU the model dominates and the
ratio says little.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tlpipe.data.loader import ArrayBatches, streaming_reader
from tlpipe.data.prepared import Split, load_split, save_split
from tlpipe.train.loop import TrainConfig, fit, resolve_device
from tlpipe.train.models import build_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_split(root: Path, n: int, size: int) -> Path:
    """A prepared `source` split of `n` random RGB images, written chunk by chunk."""
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(root / "tmp.npy", "w+", np.uint8, (n, 3, size, size))
    for i in range(0, n, 256):
        x[i : i + 256] = rng.integers(0, 256, x[i : i + 256].shape, dtype=np.uint8)
    save_split(root, "source", Split(x=x, y=np.arange(n) % 10, shifted=np.zeros(n, bool)))
    del x
    (root / "tmp.npy").unlink()
    return root


class OnDevice:
    """The ceiling: `steps` batches of uint8 images already on the device (cycled)."""

    def __init__(self, n: int, size: int, batch: int, steps: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.x, self.y = self.x.to(device), (torch.arange(n) % 10).to(device)
        self.batch_size, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    @property
    def nbytes(self) -> int:
        return 0  # always the in-memory route: it is on the device already

    def to(self, device: torch.device) -> OnDevice:
        return self

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        start = (step * self.batch_size) % (len(self.x) - self.batch_size + 1)
        x, y = self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
        return {"x": x, "y": y, "domain": torch.zeros_like(y)}


def images_per_s(batches, cfg: TrainConfig, size: int) -> float:
    """Training images/s of one `fit` epoch over `batches` (worker start-up included)."""
    model = build_model("resnet18", 10, 3, size)
    start = time.perf_counter()
    fit(model, batches, cfg, mean=MEAN, std=STD, desc="bench")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return cfg.steps_per_epoch * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument(
        "--repeats", type=int, help="alternate measurements of each (default 3; --quick 1)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a test on a CPU")
    args = ap.parse_args()
    if args.quick:
        args.images, args.size, args.steps, args.batch, args.workers = 48, 32, 3, 8, 2
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    device = resolve_device(args.device)
    reader = streaming_reader(device)  # what `fit`'s Feed streams with on this device
    common = dict(
        epochs=1,
        batch_size=args.batch,
        steps_per_epoch=args.steps,
        lr=0.01,
        augment=True,
        device=str(device),
        num_workers=args.workers,
    )
    with tempfile.TemporaryDirectory(prefix="tlpipe-gpu-loader-") as tmp:
        split = load_split(write_split(Path(tmp), args.images, args.size), "source")
        streamed = ArrayBatches(split.x, split.y, args.batch, steps_per_epoch=args.steps)
        # warm-up, not measured: cuDNN autotune, the allocators (the pinned one too) and the
        # page cache, so that the first of the alternate measurements is not the slow one
        warm = OnDevice(args.images, args.size, args.batch, 2, device)
        images_per_s(warm, TrainConfig(**common | {"steps_per_epoch": 2}), args.size)
        n = min(args.steps, 2 * args.workers + 4)  # enough batches to fill the read-ahead
        warm_cfg = TrainConfig(**common | {"steps_per_epoch": n, "max_in_memory_mb": 0})
        warm = ArrayBatches(split.x, split.y, args.batch, steps_per_epoch=n)
        images_per_s(warm, warm_cfg, args.size)
        ceiling_batches = OnDevice(args.images, args.size, args.batch, args.steps, device)
        ceilings, tlpipes = [], []
        for _ in range(args.repeats):
            ceilings.append(images_per_s(ceiling_batches, TrainConfig(**common), args.size))
            stream_cfg = TrainConfig(**common, max_in_memory_mb=0)
            tlpipes.append(images_per_s(streamed, stream_cfg, args.size))
    ceiling, tlpipe = statistics.median(ceilings), statistics.median(tlpipes)
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})"
        f", resnet18 {args.size} px, batch {args.batch}, {args.steps} steps, "
        f"{args.workers} workers, reader {reader}"
    )
    each = ", ".join(f"{v:.0f}" for v in tlpipes)
    print(f"tlpipe streaming loader: {tlpipe:.1f} images/s (median of {each})")
    each = ", ".join(f"{v:.0f}" for v in ceilings)
    print(f"synthetic on device:     {ceiling:.1f} images/s (median of {each})")
    print(f"loader throughput tlpipe/on-device = {tlpipe / ceiling:.2f}")


if __name__ == "__main__":
    main()
