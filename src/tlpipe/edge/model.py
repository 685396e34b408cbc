"""The edge runtime: classify images with an exported `model.onnx` — no torch needed.

Imports numpy, pillow and onnxruntime only (mlflow too, lazily, for `models:/` URIs), so it runs
on a device that has `pip install tlpipe[edge]`. Everything needed to serve the model — class
names, input shape, mean/std — is read from the file's metadata_props (written by the export
step), so a model file is all a device needs::

    tlpipe-edge predict export/model.onnx shoe.png photos/
    tlpipe-edge bench export/model.int8.onnx --batch 1 --runs 200
    tlpipe-edge info models:/tlpipe@champion

Python::

    from tlpipe.edge import EdgeModel
    EdgeModel("model.onnx").predict(["shoe.png"])   # → [("Sandal", 0.97)]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.errors import TlpipeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
REQUIRED_METADATA = ("classes", "input_shape", "mean", "std")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class EdgeModel:
    """An exported tlpipe classifier on ONNX Runtime.

    Args:
        path: An ONNX file written by the export step, or a registry URI
            (`models:/<name>@<alias>` or `models:/<name>/<version>`; needs mlflow).
        provider: "auto" (CUDA when onnxruntime has it, else CPU), "cpu" or "cuda".
        threads: Intra-op threads; 0 lets onnxruntime decide.
        artifact: For registry URIs, which run artifact to fetch.
    """

    def __init__(
        self,
        path: str | Path,
        provider: str = "auto",
        threads: int = 0,
        artifact: str = "onnx/model.onnx",
    ):
        import onnxruntime as ort

        if str(path).startswith("models:/"):
            path = download_registered(str(path), artifact)
        self.path = Path(path)
        if not self.path.is_file():
            raise TlpipeError(f"model file {self.path} not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only: a device log is not the place for hints
        try:
            self.session = ort.InferenceSession(
                str(self.path), opts, providers=select_providers(provider)
            )
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own untyped errors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TlpipeError(f"{self.path} is not a loadable ONNX model: {msg}") from e
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise TlpipeError(f"{self.path} lacks tlpipe metadata ({', '.join(missing)}): "
                              "export it with `tlpipe export`")  # fmt: skip
        try:
            self.classes: list[str] = json.loads(self.metadata["classes"])
            c, h, w = json.loads(self.metadata["input_shape"])
            self.input_shape = (int(c), int(h), int(w))
            self.mean = np.asarray(json.loads(self.metadata["mean"]), np.float32).reshape(-1, 1, 1)
            self.std = np.asarray(json.loads(self.metadata["std"]), np.float32).reshape(-1, 1, 1)
        except (ValueError, TypeError) as e:
            raise TlpipeError(f"{self.path} has unreadable tlpipe metadata ({e})") from e

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def preprocess(self, images: Any) -> np.ndarray:
        """Images → normalised float32 (N, C, H, W), as the export step's `input` expects."""
        x = self.to_uint8(images).astype(np.float32)
        return (x / 255.0 - self.mean) / self.std

    def to_uint8(self, images: Any) -> np.ndarray:
        """Images (paths, PIL images, uint8 arrays, or a uint8 (N,C,H,W) batch) → uint8 batch."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.input_shape:
                want = ", ".join(map(str, self.input_shape))
                raise TlpipeError(f"a batch must be uint8 (N, {want}), got {images.dtype} "
                                  f"{images.shape}")  # fmt: skip
            return images
        if isinstance(images, str | Path | np.ndarray) or hasattr(images, "convert"):
            images = [images]
        arrays = [self._one(img) for img in images]
        return np.stack(arrays) if arrays else np.zeros((0, *self.input_shape), np.uint8)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model output for normalised float32 (N, C, H, W)."""
        return self.session.run(["logits"], {"input": np.ascontiguousarray(x, np.float32)})[0]

    def predict_proba(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, K)."""
        x = self.preprocess(images)
        logits = [self.logits(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return softmax(np.concatenate(logits) if logits else np.zeros((0, len(self.classes))))

    def predict(self, images: Any, batch_size: int = 64) -> list[tuple[str, float]]:
        """(label, probability) of the most likely class, per image."""
        probs = self.predict_proba(images, batch_size)
        best = probs.argmax(1)
        return [(self.classes[i], float(probs[n, i])) for n, i in enumerate(best.tolist())]

    def _one(self, img: Any) -> np.ndarray:
        from PIL import Image

        c, h, w = self.input_shape
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8:
                raise TlpipeError(f"image arrays must be uint8, got {img.dtype}")
            if img.shape == self.input_shape:  # already (C, H, W)
                return img
            if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3, 4):
                img = img.transpose(1, 2, 0)  # (C, H, W) of another size → (H, W, C)
            try:
                img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img)
            except (TypeError, ValueError) as e:
                raise TlpipeError(f"cannot read an image from an array of shape {img.shape}") from e
        elif isinstance(img, str | Path):
            return _load_file(Path(img), c, h, w)
        elif not hasattr(img, "convert"):
            raise TlpipeError(f"cannot read an image from a {type(img).__name__}")
        return _to_chw(img, c, h, w)


def _load_file(path: Path, c: int, h: int, w: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return _to_chw(img, c, h, w)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise TlpipeError(f"{path}: not a readable image ({e})") from e


def _to_chw(img: Any, c: int, h: int, w: int) -> np.ndarray:
    """PIL image → uint8 (C, H, W); the same conversion as `tlpipe.data.load_image`."""
    from PIL import Image

    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, np.uint8)
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def select_providers(provider: str = "auto") -> list[str]:
    """onnxruntime providers for "auto" (CUDA if available, else CPU), "cpu" or "cuda"."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "auto":
        provider = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if provider not in PROVIDERS:
        raise TlpipeError(f"unknown provider {provider!r}; choose auto, cpu or cuda")
    if PROVIDERS[provider] not in available:
        have = ", ".join(available)
        raise TlpipeError(f"provider {provider!r} is not in this onnxruntime ({have}); "
                          "install onnxruntime-gpu for CUDA")  # fmt: skip
    return [PROVIDERS[provider], PROVIDERS["cpu"]] if provider == "cuda" else [PROVIDERS["cpu"]]


# ---------------------------------------------------------------------------- registry


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` → (name, alias, None); `models:/name/3` → (name, None, "3")."""
    body = uri.removeprefix("models:/").strip("/")
    if not uri.startswith("models:/") or not body:
        raise TlpipeError(f"not a registry URI: {uri!r} (want models:/<name>@<alias> or "
                          "models:/<name>/<version>)")  # fmt: skip
    if "@" in body:
        name, _, alias = body.partition("@")
        if name and alias and "/" not in name + alias:
            return name, alias, None
    else:
        name, _, version = body.partition("/")
        if name and version.isdigit():
            return name, None, version
    raise TlpipeError(f"cannot parse {uri!r}: want models:/<name>@<alias> or "
                      "models:/<name>/<version>")  # fmt: skip


def download_registered(
    uri: str, artifact: str = "onnx/model.onnx", tracking_uri: str | None = None
) -> Path:
    """Fetch the ONNX file logged beside a registered model version (its run's `onnx/`)."""
    name, alias, version = parse_model_uri(uri)
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError as e:
        raise TlpipeError("loading models:/ URIs needs mlflow (pip install mlflow); or download "
                          "model.onnx and pass its path") from e  # fmt: skip
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, version)
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id, artifact_path=artifact, tracking_uri=tracking_uri
        )
    except MlflowException as e:
        where = f"{artifact} of {uri} from {tracking_uri}"
        raise TlpipeError(f"cannot fetch {where}: {e.message}") from e
    return Path(local)


# ---------------------------------------------------------------------------- CLI


def image_files(args: Iterable[str]) -> list[Path]:
    """Expand files and directories (recursively, image suffixes only, sorted)."""
    out: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in
                           IMAGE_SUFFIXES and not f.name.startswith("."))  # fmt: skip
            if not found:
                raise TlpipeError(f"{p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise TlpipeError(f"{p} not found")
    return out


def _cmd_predict(model: EdgeModel, args: argparse.Namespace) -> None:
    files = image_files(args.images)
    for i in range(0, len(files), args.batch_size):
        chunk = files[i : i + args.batch_size]
        for path, (label, prob) in zip(chunk, model.predict(chunk), strict=True):
            if args.json:
                row = {"path": str(path), "label": label, "probability": round(prob, 6)}
                print(json.dumps(row))
            else:
                print(f"{path}\t{label}\t{prob:.4f}")


def bench(model: EdgeModel, batch: int = 1, runs: int = 200, warmup: int = 20) -> dict[str, float]:
    """Latency of `model.logits` on random images (preprocessing excluded)."""
    rng = np.random.default_rng(0)
    x = model.preprocess(rng.integers(0, 256, (batch, *model.input_shape), dtype=np.uint8))
    for _ in range(warmup):
        model.logits(x)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        model.logits(x)
        times[i] = time.perf_counter() - t0
    p50, p90, p99 = np.percentile(times * 1e3, [50, 90, 99])
    return {"batch": batch, "runs": runs, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "images_per_s": batch * runs / times.sum()}  # fmt: skip


def _cmd_bench(model: EdgeModel, args: argparse.Namespace) -> None:
    r = bench(model, args.batch, args.runs, args.warmup)
    if args.json:
        print(json.dumps({**r, "provider": model.providers[0]}))
        return
    print(f"{model.path}  provider={model.providers[0]}  batch={args.batch}  runs={args.runs}")
    print(f"latency ms: p50 {r['p50_ms']:.3f}  p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f}")
    print(f"throughput: {r['images_per_s']:.1f} images/s")


def _cmd_info(model: EdgeModel, args: argparse.Namespace) -> None:
    first = [*REQUIRED_METADATA, "precision", "arch", "model_version", "dataset_sha256"]
    keys = [k for k in first if k in model.metadata]
    keys += sorted(set(model.metadata) - set(keys))
    info = {"path": str(model.path), "size_bytes": model.path.stat().st_size,
            "providers": model.providers, **{k: model.metadata[k] for k in keys}}  # fmt: skip
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        print(f"{key}: {value}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tlpipe-edge",
        description="Run a tlpipe-exported ONNX classifier with onnxruntime (no torch). MODEL is "
        "a model.onnx / model.int8.onnx file or a registry URI such as models:/tlpipe@champion "
        "(needs mlflow; MLFLOW_TRACKING_URI or --tracking-uri says where the registry is).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", metavar="MODEL", help="ONNX file or models:/<name>@<alias>")
    common.add_argument(
        "--provider",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="execution provider (default: CUDA if available, else CPU)",
    )
    common.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = auto)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument(
        "--int8",
        action="store_true",
        help="with a models:/ URI, fetch model.int8.onnx instead of model.onnx",
    )
    common.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow tracking URI for models:/ (default: $MLFLOW_TRACKING_URI "
        f"or {DEFAULT_TRACKING_URI})",
    )
    pr = sub.add_parser(
        "predict",
        parents=[common],
        help="classify images",
        description="Print one line per image: path, label, probability.",
    )
    pr.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files, or directories searched recursively for images",
    )
    pr.add_argument("--batch-size", type=int, default=64, help="images per inference call")
    pr.set_defaults(func=_cmd_predict)
    be = sub.add_parser(
        "bench",
        parents=[common],
        help="measure inference latency",
        description="Time inference on random images: p50/p90/p99 latency "
        "and throughput (preprocessing excluded).",
    )
    be.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    be.add_argument("--runs", type=int, default=200, help="timed calls (default 200)")
    be.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    be.set_defaults(func=_cmd_bench)
    info = sub.add_parser(
        "info",
        parents=[common],
        help="print the model's metadata",
        description="Print classes, input shape, mean/std and versions.",
    )
    info.set_defaults(func=_cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tlpipe-edge`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        sizes = [getattr(args, k, 1) for k in ("batch_size", "batch", "runs")]
        if args.threads < 0 or min(sizes) < 1:
            raise TlpipeError("--threads must be ≥ 0; --batch, --batch-size and --runs ≥ 1")
        if str(args.model).startswith("models:/"):
            artifact = "onnx/model.int8.onnx" if args.int8 else "onnx/model.onnx"
            args.model = download_registered(args.model, artifact, args.tracking_uri)
        model = EdgeModel(args.model, provider=args.provider, threads=args.threads)
        args.func(model, args)
    except TlpipeError as e:
        print(f"tlpipe-edge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tlpipe-edge predict … | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
