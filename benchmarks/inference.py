"""Inference latency: torch eager vs ONNX Runtime fp32 vs ONNX Runtime INT8, on the same images.

    python benchmarks/inference.py                      # the pipeline's model and data
    python benchmarks/inference.py --model models/source.pt --threads 2 --batch 1 64

Prints a Markdown table of p50/p90 latency per batch and the ratios ORT fp32 / torch and
INT8 / torch (lower is faster), then model sizes and accuracies. torch and onnxruntime get the
same thread count. Goal: ONNX fp32 batch-1 latency ≤ 0.5× torch eager.

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
    from tlpipe.data.prepared import load_manifest, load_split
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
    split = "target_test" if meta["classes"] == manifest["target_classes"] else "source_val"
    data = load_split(prepared, split)
    calib, counts = calibration_set(prepared, ExportConfig())
    note = f"{model_path} ({meta['arch']}) on {prepared}/{split}; INT8 calibrated on {counts}"
    return model, meta, data.x[:max_images], data.y[:max_images], calib, note


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

    from tlpipe.steps.export import export_onnx, normalise, quantize_int8

    torch.set_num_threads(args.threads)
    model, meta, x_u8, y, calib, note = load(args.model, args.prepared, args.images)
    x = normalise(x_u8, meta["mean"], meta["std"])
    fp32 = export_onnx(model, tmp / "model.onnx", x.shape[1:])
    int8 = quantize_int8(fp32, tmp / "model.int8.onnx", normalise(calib, meta["mean"], meta["std"]))

    @torch.inference_mode()
    def torch_fn(xb):
        return model(torch.from_numpy(xb)).numpy()

    engines = {"torch eager": torch_fn, "ORT fp32": _session(fp32, args.threads),
               "ORT INT8": _session(int8, args.threads)}  # fmt: skip
    rows = []
    for batch in args.batch:
        runs = max(10, args.runs // batch) if batch > 1 else args.runs
        for name, fn in engines.items():
            t = time_calls(fn, x, batch, runs) * 1e3
            p50, p90 = float(np.median(t)), float(np.percentile(t, 90))
            rows.append({"engine": name, "batch": batch, "p50_ms": p50, "p90_ms": p90,
                         "images_per_s": batch * 1e3 / p50})  # fmt: skip
    accuracy = {}
    if y is not None:
        for name, fn in engines.items():
            logits = np.concatenate([fn(x[i : i + 256]) for i in range(0, len(x), 256)])
            accuracy[name] = float((logits.argmax(1) == y).mean())
    sizes = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
    return {"note": f"{note}; {len(x)} images", "threads": args.threads, "rows": rows,
            "sizes": sizes, "accuracy": accuracy}  # fmt: skip


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda xb: sess.run(["logits"], {"input": xb})[0]


def report(note: str, threads: int, rows: list[dict], sizes: dict, accuracy: dict) -> None:
    """Print the Markdown tables."""
    import onnxruntime as ort
    import torch

    print(f"# Inference benchmark\n\n{note}; {threads} thread(s); torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs\n")  # fmt: skip
    torch_p50 = {r["batch"]: r["p50_ms"] for r in rows if r["engine"] == "torch eager"}
    print("| engine | batch | p50 ms | p90 ms | images/s | p50 / torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["p50_ms"] / torch_p50[r["batch"]]
        print(f"| {r['engine']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} "
              f"| {r['images_per_s']:.0f} | {ratio:.2f} |")  # fmt: skip
    ratio = sizes["int8"] / sizes["fp32"]
    print("\n| file | bytes | / fp32 |\n|---|---:|---:|")
    print(f"| model.onnx | {sizes['fp32']} | 1.00 |\n| model.int8.onnx | {sizes['int8']} "
          f"| {ratio:.2f} |")  # fmt: skip
    if accuracy:
        print("\n| engine | accuracy |\n|---|---:|")
        for name, acc in accuracy.items():
            print(f"| {name} | {acc:.4f} |")
        delta = 100 * (accuracy["ORT INT8"] - accuracy["ORT fp32"])
        print(f"\nINT8 accuracy delta vs ORT fp32: {delta:+.2f} points (goal ≥ -1)")
    fp32_1 = [r["p50_ms"] for r in rows if r["engine"] == "ORT fp32" and r["batch"] == 1]
    if fp32_1:
        r1 = fp32_1[0] / torch_p50[1]
        print(f"ORT fp32 batch-1 p50 = {r1:.2f}× torch eager (goal ≤ 0.5): "
              f"{'met' if r1 <= 0.5 else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
