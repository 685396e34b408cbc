"""Inference latency: torch eager vs ONNX Runtime fp32 vs ONNX Runtime INT8, on the same images.

    python benchmarks/inference.py                      # the pipeline's model and data
    python benchmarks/inference.py --model models/source.pt --threads 2 --batch 1 64
    python benchmarks/inference.py --arch resnet18 --size 64 --batch 64   # a real backbone

`--arch A --size S` (no --model) trains A briefly from random init on scikit-learn's digits,
upscaled to S px and tinted RGB (first 1 000 images; the other 797 are the test images), so
that INT8 agreement is measured on a model that has learned something.

Prints a Markdown table of p50/p90 latency per batch and the ratios ORT fp32 / torch and
INT8 / torch (lower is faster), then model sizes and accuracies. torch and onnxruntime get the
same thread count. INT8 comes twice: static (what `tlpipe export` writes by default: QDQ,
per-channel, calibrated) and dynamic (`export.int8_method: dynamic`). Goals: ONNX fp32 batch-1
latency ≤ 0.5× torch eager; static INT8 ≥ 1.3× fp32 images/s at the largest batch with argmax
agreement ≥ 0.99, else export would not publish it (its thresholds, printed).

Without a trained model or prepared data it trains nothing: it times a random-weight small_cnn
on random images and says so (accuracy is then not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def default_model() -> Path:
    """The model evaluate selected (models/finetuned/<selected>.pt), else models/source.pt."""
    selected = Path("eval/selected.txt")
    if selected.exists():
        return Path("models/finetuned") / f"{selected.read_text().strip()}.pt"
    return Path("models/source.pt")


def load(model_path: Path, prepared: Path, max_images: int):
    """(model, meta, images uint8, labels or None, calibration images uint8, note)."""
    from tlpipe.data.manifest import load_manifest
    from tlpipe.data.prepared import load_split
    from tlpipe.steps.export import ExportConfig, calibration_set
    from tlpipe.train.models import build_model, load_checkpoint

    if not model_path.exists():
        model = build_model("small_cnn", 5).eval()
        meta = {"arch": "small_cnn", "classes": list("abcde"), "mean": [0.5], "std": [0.25]}
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (max_images, 1, 28, 28), dtype=np.uint8)
        note = f"{model_path} not found: random-weight small_cnn on random images"
        return model, meta, x, None, x[:500], note
    model, meta = load_checkpoint(model_path)
    manifest = load_manifest(prepared)
    # the test split whose labels index this model's classes (source models: source_val)
    split = "target_test" if meta.classes == manifest.target_classes else "source_val"
    data = load_split(prepared, split)
    calib, counts = calibration_set(prepared, ExportConfig())
    note = f"{model_path} ({meta.arch}) on {prepared}/{split}; INT8 calibrated on {counts}"
    return model, meta, data.x[:max_images], data.y[:max_images], calib, note


def quick_model(arch: str, size: int, steps: int):
    """(model, meta, test images, test labels, calibration images, note): `arch` trained for
    `steps` steps on tinted RGB digits at `size` px (see the module docstring)."""
    import torch

    from tlpipe.params.learning import TrainConfig
    from tlpipe.train.checkpoint import CheckpointMeta
    from tlpipe.train.loop import ArrayBatches, fit
    from tlpipe.train.models import build_model

    sys.path.insert(0, str(Path(__file__).parent))
    from digits_imagefolder import load as load_digits
    from digits_imagefolder import tints

    x8, y = load_digits()  # (N, 8, 8) uint8 ink on black
    up = torch.nn.functional.interpolate(
        torch.from_numpy(x8[:, None]).float(), size=size, mode="bilinear", align_corners=False
    )
    tint = tints()[:, :, None, None]  # a colour per image, as `digits_imagefolder.py --tint`
    x = (up.numpy() * tint).clip(0, 255).astype(np.uint8)
    y = y.astype(np.int64)
    mean = [float(x[:1000, c].mean() / 255) for c in range(3)]
    std = [float(x[:1000, c].std() / 255) for c in range(3)]
    model = build_model(arch, 10, 3, size, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=32, steps_per_epoch=steps, lr=0.05, augment=False)
    fit(
        model,
        ArrayBatches(x[:1000], y[:1000], 32, steps_per_epoch=steps),
        cfg,
        mean=mean,
        std=std,
        desc=f"{arch} on digits",
    )
    classes = tuple(str(i) for i in range(10))
    meta = CheckpointMeta(
        arch=arch, in_chans=3, input_size=size, classes=classes, mean=tuple(mean), std=tuple(std)
    )
    note = (
        f"{arch} trained {steps} steps from random init on tinted RGB digits at {size} px; "
        "calibrated on 500 of its training images"
    )
    return model.eval(), meta, x[1000:], y[1000:], x[:500], note


def time_calls(fn, x: np.ndarray, batch: int, runs: int, warmup: int = 10) -> np.ndarray:
    """Seconds per call of `fn` on consecutive batches of `x` (cycling)."""
    starts = [i % max(len(x) - batch + 1, 1) for i in range(0, (runs + warmup) * batch, batch)]
    times = np.empty(runs)
    for n, s in enumerate(starts):
        xb = x[s : s + batch]
        t0 = time.perf_counter()
        fn(xb)
        if n >= warmup:
            times[n - warmup] = time.perf_counter() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=default_model(), help="tlpipe checkpoint (.pt)")
    p.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--runs", type=int, default=200, help="timed calls at batch 1 (fewer above)")
    p.add_argument("--images", type=int, default=2000, help="at most this many test images")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--arch", help="no --model: train this architecture briefly (see above)")
    p.add_argument("--size", type=int, default=64, help="--arch: input size in pixels")
    p.add_argument("--train-steps", type=int, default=150, help="--arch: training steps")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tlpipe-bench-") as tmp:
        result = benchmark(args, Path(tmp))
    report(**result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    """Export fp32 + INT8 into `tmp`, time the three engines, measure accuracy."""
    import torch

    from tlpipe.steps.export import (
        export_onnx,
        normalise,
        quantize_dynamic_int8,
        quantize_int8,
    )

    torch.set_num_threads(args.threads)
    if args.arch and not args.model.exists():
        model, meta, x_u8, y, calib, note = quick_model(args.arch, args.size, args.train_steps)
    else:
        model, meta, x_u8, y, calib, note = load(args.model, args.prepared, args.images)
    x = normalise(x_u8, meta.mean, meta.std)
    fp32 = export_onnx(model, tmp / "model.onnx", x.shape[1:])
    int8 = quantize_int8(fp32, tmp / "model.int8.onnx", normalise(calib, meta.mean, meta.std))
    dyn = quantize_dynamic_int8(fp32, tmp / "model.dyn.onnx")

    @torch.inference_mode()
    def torch_fn(xb):
        return model(torch.from_numpy(xb)).numpy()

    engines = {
        "torch eager": torch_fn,
        "ORT fp32": _session(fp32, args.threads),
        "ORT INT8": _session(int8, args.threads),
        "ORT INT8 dynamic": _session(dyn, args.threads),
    }
    rows = []
    for batch in args.batch:
        runs = max(10, args.runs // batch) if batch > 1 else args.runs
        for name, fn in engines.items():
            t = time_calls(fn, x, batch, runs) * 1e3
            p50, p90 = float(np.median(t)), float(np.percentile(t, 90))
            rows.append(
                {
                    "engine": name,
                    "batch": batch,
                    "p50_ms": p50,
                    "p90_ms": p90,
                    "images_per_s": batch * 1e3 / p50,
                }
            )
    preds = {
        name: np.concatenate([fn(x[i : i + 256]) for i in range(0, len(x), 256)]).argmax(1)
        for name, fn in engines.items()
    }
    accuracy = {n: float((p == y).mean()) for n, p in preds.items()} if y is not None else {}
    agreement = {n: float((p == preds["ORT fp32"]).mean()) for n, p in preds.items()}
    sizes = {
        "fp32": fp32.stat().st_size,
        "int8": int8.stat().st_size,
        "int8 dynamic": dyn.stat().st_size,
    }
    return {
        "note": f"{note}; {len(x)} images",
        "threads": args.threads,
        "rows": rows,
        "sizes": sizes,
        "accuracy": accuracy,
        "agreement": agreement,
    }


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda xb: sess.run(["logits"], {"input": xb})[0]


def report(
    note: str, threads: int, rows: list[dict], sizes: dict, accuracy: dict, agreement: dict
) -> None:
    """Print the Markdown tables."""
    import onnxruntime as ort
    import torch

    print(
        f"# Inference benchmark\n\n{note}; {threads} thread(s); torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs\n"
    )
    torch_p50 = {r["batch"]: r["p50_ms"] for r in rows if r["engine"] == "torch eager"}
    print("| engine | batch | p50 ms | p90 ms | images/s | p50 / torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["p50_ms"] / torch_p50[r["batch"]]
        print(
            f"| {r['engine']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} "
            f"| {r['images_per_s']:.0f} | {ratio:.2f} |"
        )
    print("\n| file | bytes | / fp32 |\n|---|---:|---:|")
    for name, size in sizes.items():
        print(f"| {name} | {size} | {size / sizes['fp32']:.2f} |")
    print("\n| engine | accuracy | argmax agreement with ORT fp32 |\n|---|---:|---:|")
    for name, agree in agreement.items():
        acc = f"{accuracy[name]:.4f}" if accuracy else "–"
        print(f"| {name} | {acc} | {agree:.4f} |")
    if accuracy:
        delta = 100 * (accuracy["ORT INT8"] - accuracy["ORT fp32"])
        print(f"\nINT8 accuracy delta vs ORT fp32: {delta:+.2f} points (goal ≥ -1)")
    _int8_verdict(rows, accuracy, agreement)
    fp32_1 = [r["p50_ms"] for r in rows if r["engine"] == "ORT fp32" and r["batch"] == 1]
    if fp32_1:
        r1 = fp32_1[0] / torch_p50[1]
        print(
            f"ORT fp32 batch-1 p50 = {r1:.2f}× torch eager (goal ≤ 0.5): "
            f"{'met' if r1 <= 0.5 else 'NOT met'}"
        )


def _int8_verdict(rows: list[dict], accuracy: dict, agreement: dict) -> None:
    """Static INT8 vs fp32 at the largest batch, and what `tlpipe export` would decide."""
    from tlpipe.params import ExportConfig
    from tlpipe.steps.export import int8_verdict

    batch = max(r["batch"] for r in rows)
    speed = {r["engine"]: r["images_per_s"] for r in rows if r["batch"] == batch}
    for name in ("ORT INT8", "ORT INT8 dynamic"):
        ratio = speed[name] / speed["ORT fp32"]
        print(
            f"{name} / ORT fp32 images/s at batch {batch} = {ratio:.2f}× (goal ≥ 1.3): "
            f"{'met' if ratio >= 1.3 else 'NOT met'}; agreement {agreement[name]:.4f} "
            f"(goal ≥ 0.99): {'met' if agreement[name] >= 0.99 else 'NOT met'}"
        )
    if accuracy:
        cfg = ExportConfig()
        v = int8_verdict(
            {"argmax_agreement": agreement["ORT INT8"], "accuracy": accuracy["ORT INT8"]},
            {"accuracy": accuracy["ORT fp32"]},
            cfg,
        )
        decision = "publish" if v["published"] else "NOT publish"
        print(
            f"tlpipe export (default thresholds) would {decision} the static INT8 file: "
            f"{v['reason']}"
        )


if __name__ == "__main__":
    sys.exit(main())
