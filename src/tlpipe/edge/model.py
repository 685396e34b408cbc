"""An exported tlpipe classifier on ONNX Runtime, and the image loading in front of it.

Imports numpy, pillow and onnxruntime only. Everything needed to serve the model — class names,
input shape, mean/std — is read from the file's metadata_props (written by the export step).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.errors import TlpipeError
from tlpipe.pixels import to_chw

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
REQUIRED_METADATA = ("classes", "input_shape", "mean", "std")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# 40 MP: above any phone or DSLR photo; decoding it as RGB takes ~120 MB. A 13 300² PNG bomb
# (177 MP) is refused from its header, before a byte of pixels is decoded.
DEFAULT_MAX_PIXELS = 40_000_000
MAX_CLASSES = 100_000  # more names than any classifier head we export; bounds the metadata
MAX_METADATA_CHARS = 10_000_000
MAX_SIDE = 8192  # input side in pixels


def metadata_problem(model: EdgeModel) -> str:
    """What is wrong with a model's metadata against its graph ("" when nothing is).

    The graph is the truth: the class list must name every output, the input shape must be
    the graph's, and there must be one mean and one std > 0 per input channel.
    """
    classes, (c, h, w) = model.classes, model.input_shape
    if not isinstance(classes, list) or not all(isinstance(n, str) for n in classes):
        return "classes is not a list of names"
    if not 2 <= len(classes) <= MAX_CLASSES:
        return f"{len(classes)} classes (want 2 to {MAX_CLASSES:,})"
    if c not in (1, 3) or not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        return f"input_shape {[c, h, w]} (want 1 or 3 channels, sides 1 to {MAX_SIDE})"
    for name, values in (("mean", model.mean), ("std", model.std)):
        if values.size != c or not np.isfinite(values).all():
            return f"{name} {values.ravel().tolist()} (want {c} finite number(s), one a channel)"
    if (model.std <= 0).any():
        return f"std {model.std.ravel().tolist()} (want > 0: it divides)"
    inputs = {i.name: i.shape for i in model.session.get_inputs()}
    outputs = {o.name: o.shape for o in model.session.get_outputs()}
    if "input" not in inputs or "logits" not in outputs:
        return f"graph inputs {list(inputs)} and outputs {list(outputs)} (want input, logits)"
    graph_in, graph_out = list(inputs["input"])[1:], list(outputs["logits"])[1:]
    fixed = [(g, m) for g, m in zip(graph_in, (c, h, w), strict=False) if isinstance(g, int)]
    if len(graph_in) != 3 or any(g != m for g, m in fixed):
        return f"input_shape {[c, h, w]}, but the graph takes {graph_in}"
    if len(graph_out) != 1 or (isinstance(graph_out[0], int) and graph_out[0] != len(classes)):
        return f"{len(classes)} classes, but the graph has {graph_out} outputs"
    return ""


class EdgeModel:
    """An exported tlpipe classifier on ONNX Runtime.

    Args:
        path: An ONNX file written by the export step.
        provider: "auto" (CUDA when onnxruntime has it, else CPU), "cpu" or "cuda".
        threads: Intra-op threads; 0 lets onnxruntime decide.
        max_pixels: Image files with more pixels (width × height, read from the header) are
            refused before decoding.
    """

    def __init__(
        self,
        path: str | Path,
        provider: str = "auto",
        threads: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        import onnxruntime as ort

        if str(path).startswith("models:/"):
            raise TlpipeError(
                f"{path}: the edge runtime does not read registry URIs; run "
                "`tlpipe-edge pull`, then predict from the model directory"
            )
        self.path = Path(path)
        self.max_pixels = max_pixels
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
            raise TlpipeError(
                f"{self.path} lacks tlpipe metadata ({', '.join(missing)}): "
                "export it with `tlpipe export`"
            )
        too_long = [k for k in REQUIRED_METADATA if len(self.metadata[k]) > MAX_METADATA_CHARS]
        if too_long:
            raise TlpipeError(
                f"{self.path}: tlpipe metadata {too_long[0]} is over "
                f"{MAX_METADATA_CHARS:,} characters: refused"
            )
        try:
            self.classes: list[str] = json.loads(self.metadata["classes"])
            c, h, w = json.loads(self.metadata["input_shape"])
            self.input_shape = (int(c), int(h), int(w))
            self.mean = np.asarray(json.loads(self.metadata["mean"]), np.float32).reshape(-1, 1, 1)
            self.std = np.asarray(json.loads(self.metadata["std"]), np.float32).reshape(-1, 1, 1)
        except (ValueError, TypeError) as e:
            raise TlpipeError(f"{self.path} has unreadable tlpipe metadata ({e})") from e
        if problem := metadata_problem(self):
            raise TlpipeError(
                f"{self.path}: tlpipe metadata does not fit the model: {problem}; re-export it "
                "with `tlpipe export`"
            )

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
                raise TlpipeError(
                    f"a batch must be uint8 (N, {want}), got {images.dtype} {images.shape}"
                )
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
        """(label, probability) of the most likely class, per image; a bad image raises."""
        probs = self.predict_proba(images, batch_size)
        best = probs.argmax(1)
        return [(self.classes[i], float(probs[n, i])) for n, i in enumerate(best.tolist())]

    def classify_files(
        self, paths: Iterable[Path], batch_size: int = 64
    ) -> Iterator[tuple[Path, tuple[str, float] | TlpipeError]]:
        """(path, (label, probability)) per file, or (path, error) for a file that won't load.

        One unreadable or oversized file costs only its own answer, not its batch's.
        """
        paths = list(paths)
        for i in range(0, len(paths), batch_size):
            loaded: list[tuple[Path, np.ndarray]] = []
            for path in paths[i : i + batch_size]:
                try:
                    loaded.append((path, self._one(Path(path))))
                except TlpipeError as e:
                    yield path, e
            if loaded:
                answers = self.predict(np.stack([arr for _, arr in loaded]), batch_size)
                yield from zip((p for p, _ in loaded), answers, strict=True)

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
            return load_file(Path(img), c, h, w, self.max_pixels)
        elif not hasattr(img, "convert"):
            raise TlpipeError(f"cannot read an image from a {type(img).__name__}")
        try:
            return to_chw(img, c, w, h, draft=False)  # the caller's image: not shrunk
        except (OSError, ValueError, SyntaxError) as e:  # as load_file: one line, no traceback
            raise TlpipeError(f"cannot read the image: {' '.join(str(e).split())}") from e


def load_file(
    path: Path, c: int, h: int, w: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Image file → uint8 (C, H, W); refused from its header when it has over `max_pixels`."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL warns above 89 MP; the limit below is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise TlpipeError(
                    f"{path}: {width}×{height} = {width * height} pixels is over the "
                    f"limit of {max_pixels} (--max-pixels); not decoded"
                )
            return to_chw(img, c, w, h)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise TlpipeError(f"{path}: not a readable image ({msg})") from e


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
        raise TlpipeError(
            f"provider {provider!r} is not in this onnxruntime ({have}); "
            "install onnxruntime-gpu for CUDA"
        )
    return [PROVIDERS[provider], PROVIDERS["cpu"]] if provider == "cuda" else [PROVIDERS["cpu"]]


def image_files(args: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (recursively, image suffixes only, sorted)."""
    out: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
            )
            if not found:
                raise TlpipeError(f"{p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise TlpipeError(f"{p} not found")
    return out


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
    return {
        "batch": batch,
        "runs": runs,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "images_per_s": batch * runs / times.sum(),
    }
