"""Scale: prepare and train from ImageFolders of 2k, 20k and 100k JPEGs; peak RSS and images/s.

    python benchmarks/data_scale.py [--work /tmp/tlpipe-data-scale] [--workers 2] [--repeats 3]
    python benchmarks/data_scale.py --quick        # small N, for a test

For each case (N JPEGs at 64 px with small_cnn, and 5 000 at 224 px with resnet18) the script
generates a 10-class ImageFolder deterministically (cached under --work), then runs, each in
its own subprocess so that its peak RSS (the largest process: the step or one of its DataLoader
workers, from wait4) is its own:

- prepare: `tlpipe.steps.prepare.run` on the folder (source = classes 0-4); images/s, peak RSS.
- train: one epoch of `steps` batches on the prepared source split through `tlpipe.train.loop.fit`
  (streaming: `max_in_memory_mb=0`, and the automatic route), and the same model, optimizer,
  batches and augmentation (2 px translation + flip) through a plain `torchvision.datasets.
  ImageFolder` + `DataLoader` on the same JPEGs; images/s, peak RSS. Same worker count. The
  training runs are interleaved `--repeats` times and the median rate is kept (shared CPU).

It ends with `peak RSS ratio 100k/2k = X.XX; loader throughput tlpipe/torchvision = Y.YY`: the
RSS ratio is the largest of prepare's and training's (largest vs smallest 64 px case), the
throughput ratio the smaller of the two models' (tlpipe streaming / torchvision).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
N_CLASSES, SOURCE = 10, 5


# ---------------------------------------------------------------------------- data


def generate(root: Path, n: int, size: int) -> Path:
    """A 10-class ImageFolder of `n` JPEGs (90 % train/, 10 % test/), made once per (n, size)."""
    from PIL import Image

    if (root / "complete").exists():
        return root
    rng = np.random.default_rng([n, size])
    side = size // 4
    for split in ("train", "test"):
        for c in range(N_CLASSES):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % N_CLASSES
        folder = root / ("test" if (i // N_CLASSES) % 10 == 9 else "train") / f"c{c}"
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        top, left = (c // 5) * size // 2 + rng.integers(0, side), (c % 5) * size // 5
        img[top : top + side, left : left + side] = rng.integers(150, 256, 3, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)
    (root / "complete").write_text(f"{n} images of {size} px\n")
    return root


# ---------------------------------------------------------------------------- child tasks


def task_prepare(raw: str, out: str, size: int) -> dict:
    from tlpipe.data.readers import write_side
    from tlpipe.params import PrepareConfig, fields
    from tlpipe.steps import prepare

    values = {
        "source": {"classes": list(range(SOURCE)), "max_per_class": None},
        "target": {"classes": list(range(SOURCE, N_CLASSES)), "k": 5, "val_per_class": 5},
        "channels": 3,
        "input_size": size,
    }
    cfg = fields.build(PrepareConfig, values, where="prepare.")
    # fetch's layout without copying the JPEGs (fetch is not what is measured): one dataset,
    # split by class, data/raw/source a link to the generated folder
    layout = Path(out).with_name(Path(out).name + "-raw")
    if not layout.exists():
        layout.mkdir()
        (layout / "source").symlink_to(Path(raw).resolve())
        write_side(layout, "source", {"dataset": "scale", "format": "imagefolder"})
        write_side(layout, "target", {"same_as": "source"})
    start = time.perf_counter()
    prepare.run(layout, Path(out), cfg)
    images = sum(1 for _ in Path(raw).rglob("*.jpg"))
    return {"images": images, "seconds": time.perf_counter() - start}


def task_tlpipe(
    prepared: str, model: str, size: int, steps: int, batch: int, workers: int, limit_mb: float
) -> dict:
    from tlpipe.data.prepared import load_split
    from tlpipe.train.loop import ArrayBatches, TrainConfig, fit
    from tlpipe.train.models import build_model

    src = load_split(prepared, "source")
    cfg = TrainConfig(
        epochs=1,
        batch_size=batch,
        steps_per_epoch=steps,
        lr=0.01,
        augment=True,
        device="cpu",
        num_workers=workers,
        max_in_memory_mb=limit_mb,
    )
    net = build_model(model, SOURCE, 3, size)
    start = time.perf_counter()
    fit(
        net,
        ArrayBatches(src.x, src.y, batch, steps_per_epoch=steps),
        cfg,
        mean=MEAN,
        std=STD,
        desc="tlpipe",
    )
    return {"images": steps * batch, "seconds": time.perf_counter() - start}


def task_torchvision(raw: str, model: str, size: int, steps: int, batch: int, workers: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from tlpipe.train.models import build_model

    class SourceFolder(datasets.ImageFolder):  # the source classes, as tlpipe's source split
        def find_classes(self, directory):
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())[:SOURCE]
            return classes, {c: i for i, c in enumerate(classes)}

    tf = transforms.Compose(
        [
            transforms.RandomCrop(size, padding=2),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    data = SourceFolder(str(Path(raw) / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers
    )
    net = build_model(model, SOURCE, 3, size)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    net.train()
    start, done = time.perf_counter(), 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return {"images": steps * batch, "seconds": time.perf_counter() - start}


TASKS = {"prepare": task_prepare, "tlpipe": task_tlpipe, "torchvision": task_torchvision}


def run_child(task: str, *args: object) -> dict:
    """Run TASKS[task](*args) in a subprocess; its result plus its peak RSS in MB (wait4)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"tlpipe-scale-{os.getpid()}.json"
    cmd = [sys.executable, __file__, "--child", task, json.dumps([str(a) for a in args]), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{task} {args} failed with exit code {proc.returncode}")
    result = json.loads(out.read_text())
    out.unlink()
    return result | {
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "rate": result["images"] / result["seconds"],
    }


def child(task: str, args_json: str, out: str) -> None:
    fn = TASKS[task]
    raw = json.loads(args_json)
    types = list(fn.__annotations__.values())[: len(raw)]
    args = [{"int": int, "float": float}.get(t, str)(a) for t, a in zip(types, raw, strict=True)]
    Path(out).write_text(json.dumps(fn(*args)))


# ---------------------------------------------------------------------------- main


def median_run(repeats: int, runs: dict[str, tuple]) -> dict[str, dict]:
    """Each of `runs` (name → run_child args) `repeats` times, interleaved; the median rate.

    The CPU is shared: interleaving spreads other load over every side of a ratio.
    """
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, args in runs.items():
            results[name].append(run_child(*args))
    return {
        name: sorted(rs, key=lambda r: r["rate"])[len(rs) // 2]
        | {"peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
        for name, rs in results.items()
    }


def case(
    work: Path, n: int, size: int, model: str, steps: int, batch: int, workers: int, repeats: int
) -> dict:
    t0 = time.perf_counter()
    raw = generate(work / f"folder-{n}-{size}", n, size)
    print(f"[{n} x {size} px] folder ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    prepared = work / f"prepared-{n}-{size}"
    row = {
        "n": n,
        "size": size,
        "model": model,
        "prepare": run_child("prepare", raw, prepared, size),
    }
    train = (model, size, steps, batch, workers)
    row |= median_run(
        repeats,
        {
            "tlpipe": ("tlpipe", prepared, *train, 0.0),
            "auto": ("tlpipe", prepared, *train, 256.0),
            "torchvision": ("torchvision", raw, *train),
        },
    )
    p, t, a, v = row["prepare"], row["tlpipe"], row["auto"], row["torchvision"]
    print(
        f"[{n} x {size} px, {model}] prepare {p['rate']:.0f} images/s, peak RSS "
        f"{p['peak_rss_mb']:.0f} MB | train images/s: tlpipe streaming {t['rate']:.1f} "
        f"(peak RSS {t['peak_rss_mb']:.0f} MB), tlpipe auto {a['rate']:.1f} (peak RSS "
        f"{a['peak_rss_mb']:.0f} MB), torchvision {v['rate']:.1f} (peak RSS "
        f"{v['peak_rss_mb']:.0f} MB)",
        flush=True,
    )
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/tlpipe-data-scale"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; the median")
    ap.add_argument("--quick", action="store_true", help="small N and sizes (a test)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if args.quick:  # (n, size, model, steps, batch)
        args.repeats = 1
        cases = [
            (200, 32, "small_cnn", 3, 16),
            (1000, 32, "small_cnn", 3, 16),
            (120, 48, "resnet18", 2, 8),
        ]
    else:
        cases = [
            (2000, 64, "small_cnn", 40, 128),
            (20000, 64, "small_cnn", 40, 128),
            (100000, 64, "small_cnn", 40, 128),
            (5000, 224, "resnet18", 6, 32),
        ]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [case(args.work, *c, args.workers, args.repeats) for c in cases]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    small = [r for r in rows if r["model"] == "small_cnn"]
    lo, hi = small[0], small[-1]
    rss = max(hi[s]["peak_rss_mb"] / lo[s]["peak_rss_mb"] for s in ("prepare", "tlpipe", "auto"))
    speed = min(r["tlpipe"]["rate"] / r["torchvision"]["rate"] for r in (hi, rows[-1]))
    for stage in ("prepare", "tlpipe", "auto"):
        print(
            f"peak RSS {stage}: {hi['n']}: {hi[stage]['peak_rss_mb']:.0f} MB, "
            f"{lo['n']}: {lo[stage]['peak_rss_mb']:.0f} MB"
        )
    print(f"peak RSS ratio 100k/2k = {rss:.2f}; loader throughput tlpipe/torchvision = {speed:.2f}")


if __name__ == "__main__":
    main()
