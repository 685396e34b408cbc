"""Where choosing source samples should pay: a pooled source, part of it close to the target.

    python benchmarks/pooled_source.py --seeds 0 1 2 3 4 [--fashion-per-class 300] [--work DIR]
    python benchmarks/pooled_source.py --quick     # a smoke run

Source = Fashion-MNIST (`--fashion-per-class` images of each of its 10 classes) pooled with
scikit-learn's digits 0-4 (15 classes, one ImageFolder); target = digits 5-9 (k labelled
images per class, the rest validation/test by the usual content-hash split). Only the digits
in the pool look like the target. `match` with the domain discriminator should find them;
the uniform matcher weights every source image alike. For each seed (which target images are
labelled, the fine-tune init) `joint` and `specialist` run with both matchers from the same
source model, so each seed gives a paired difference discriminator − uniform on the target
test split. Prints the table, the share of digits among the selected source images, and the
mean paired difference with its spread. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import load_split
from tlpipe.params.learning import SelectionConfig
from tlpipe.params.resolver import resolve
from tlpipe.steps import fetch, finetune, match, prepare, pretrain
from tlpipe.train.loop import accuracy
from tlpipe.train.models import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from digits_imagefolder import load as load_digits  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
STRATEGIES = ("joint", "specialist")
MATCHERS = ("discriminator", "uniform")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_folders(work: Path, fashion_per_class: int) -> tuple[Path, Path]:
    """work/pooled/<class>/*.png (Fashion-MNIST + digits 0-4) and work/target/<digit>/*.png."""
    pooled, target = work / "pooled", work / "target"
    if pooled.exists() and target.exists():
        return pooled, target
    x = _idx(FMNIST / "train-images-idx3-ubyte.gz")
    y = _idx(FMNIST / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(y == c))[:fashion_per_class]
        (pooled / f"fashion{c}").mkdir(parents=True, exist_ok=True)
        for i in rows:
            (pooled / f"fashion{c}" / f"{i:05d}.png").write_bytes(_png(x[i]))
    dx, dy = load_digits()
    for i, (image, label) in enumerate(zip(dx, dy, strict=True)):
        folder = pooled / f"digit{label}" if label < 5 else target / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(_png(image))
    return pooled, target


def params_for(pooled: Path, target: Path, k: int, quick: bool) -> dict[str, Any]:
    params: dict[str, Any] = {
        "fetch": {
            "source": {"dataset": "pooled", "format": "imagefolder", "sources": [str(pooled)]},
            "target": {"dataset": "digits59", "format": "imagefolder", "sources": [str(target)]},
        },
        "prepare": {
            "source": {"classes": []},
            "target": {"classes": [], "k": k, "val_per_class": 5},
            "channels": 1,
            "input_size": 28,
        },
        "pretrain": {"train": {"epochs": 1 if quick else 3}},
        "match": {"plots": False},
        "finetune": {
            "train": {"epochs": 2 if quick else 10},
            "specialist": {"epochs": 1 if quick else 2},
        },
    }
    return params


def digit_share(prepared: Path, match_dir: Path) -> float:
    """Share of digits among the source images `match` selected."""
    names = load_manifest(prepared).source_classes
    y = load_split(prepared, "source").y
    selected = np.load(match_dir / "selected.npy")
    rows = np.flatnonzero(selected) if selected.dtype == bool else selected
    return float(np.mean([names[c].startswith("digit") for c in y[rows]]))


def test_accuracy(prepared: Path, model_path: Path) -> float:
    model, meta = load_checkpoint(model_path)
    test = load_split(prepared, "target_test")
    return accuracy(model, test.x, test.y, mean=meta.mean, std=meta.std)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--fashion-per-class", type=int, default=300)
    ap.add_argument("--k", type=int, default=10, help="labelled target images per digit")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="1 seed, 50 per class, tiny epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.fashion_per_class = [0], 50
    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-pooled-"))
    t0 = time.perf_counter()
    pooled, target = write_folders(work, args.fashion_per_class)
    params = params_for(pooled, target, args.k, args.quick)
    raw, source = work / "raw", work / "source.pt"
    if not raw.exists():
        fetch.run(resolve(params)["fetch"], raw)
    if not source.exists():
        prepare.run(raw, work / "prep-source", resolve(params)["prepare"])
        pretrain.run(work / "prep-source", source, resolve(params)["pretrain"])
    print(
        f"source: {args.fashion_per_class}/class Fashion-MNIST + digits 0-4; target digits "
        f"5-9, k = {args.k}; budget {params['finetune']}"
    )
    cols = [f"{s} {m}" for s in STRATEGIES for m in MATCHERS]
    print(f"| seed | {' | '.join(cols)} | digits among selected (disc / uniform) |")
    print("|---:|" + "---:|" * (len(cols) + 1))
    diffs: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for seed in args.seeds:
        seeded = {
            "finetune": {
                **params["finetune"],
                "train": {**params["finetune"]["train"], "seed": seed},
            }
        }
        resolved = resolve({**params, "prepare": {**params["prepare"], "seed": seed}, **seeded})
        prep = work / f"prep-s{seed}"
        if not prep.exists():
            prepare.run(raw, prep, resolved["prepare"])
        acc, share = {}, {}
        for matcher in MATCHERS:
            mdir = work / f"match-{matcher}-s{seed}"
            if not mdir.exists():
                cfg = resolve({**params, "match": {"plots": False, "matcher": matcher}})["match"]
                match.run(prep, source, mdir, cfg)
            share[matcher] = digit_share(prep, mdir)
            for strategy in STRATEGIES:
                out = work / f"models-s{seed}" / f"{strategy}-{matcher}.pt"
                if not out.exists():
                    # no cross-validated selection: this benchmark compares matchers, not picks
                    cfg = dataclasses.replace(
                        resolved["finetune"].for_strategy(strategy),
                        selection=SelectionConfig(min_val=0),
                    )
                    finetune.run(prep, source, out, cfg, match_dir=mdir)
                acc[f"{strategy} {matcher}"] = test_accuracy(prep, out)
        for s in STRATEGIES:
            diffs[s].append(100 * (acc[f"{s} discriminator"] - acc[f"{s} uniform"]))
        print(
            f"| {seed} | "
            + " | ".join(f"{100 * acc[c]:.1f}" for c in cols)
            + f" | {share['discriminator']:.2f} / {share['uniform']:.2f} |",
            flush=True,
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; files in {work}")
    for s in STRATEGIES:
        d = diffs[s]
        sd = statistics.stdev(d) if len(d) > 1 else float("nan")
        wins = sum(v > 0 for v in d)
        print(
            f"{s}: discriminator − uniform = {statistics.mean(d):+.2f} pt (sd {sd:.2f}, "
            f"{len(d)} paired seeds, discriminator ahead in {wins})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
