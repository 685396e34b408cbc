"""`tlpipe-edge`: pull / rollback the registry's model, predict, bench, info — no torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlpipe.edge.model import DEFAULT_MAX_PIXELS, REQUIRED_METADATA, EdgeModel, bench, image_files
from tlpipe.edge.pull import VARIANTS, pull
from tlpipe.edge.rest_client import Registry
from tlpipe.edge.store import ModelStore
from tlpipe.errors import TlpipeError

MODEL_DIR_ENV = "TLPIPE_EDGE_MODEL_DIR"


def default_model_dir() -> Path:
    """$TLPIPE_EDGE_MODEL_DIR, else $XDG_DATA_HOME/tlpipe-edge (~/.local/share/tlpipe-edge)."""
    if os.environ.get(MODEL_DIR_ENV):
        return Path(os.environ[MODEL_DIR_ENV])
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "tlpipe-edge"


def _load(args: argparse.Namespace, model: str | None) -> EdgeModel:
    path = Path(model) if model else ModelStore(args.model_dir).model_path()
    return EdgeModel(
        path, args.provider, args.threads, getattr(args, "max_pixels", DEFAULT_MAX_PIXELS)
    )


def _cmd_predict(args: argparse.Namespace) -> int:
    inputs = list(args.images)
    # the first argument is the model when it names one; else the model directory serves
    is_model = inputs[0].endswith(".onnx") or inputs[0].startswith("models:/")
    explicit = inputs.pop(0) if is_model else None
    if not inputs:
        raise TlpipeError("no images given: tlpipe-edge predict [MODEL.onnx] IMAGE_OR_DIR …")
    model = _load(args, explicit)
    files = image_files(inputs)
    failed = 0
    for path, answer in model.classify_files(files, args.batch_size):
        if isinstance(answer, TlpipeError):  # one bad file costs its own line only
            failed += 1
            print(f"tlpipe-edge: error: {answer}", file=sys.stderr, flush=True)
        elif args.json:
            row = {"path": str(path), "label": answer[0], "probability": round(answer[1], 6)}
            print(json.dumps(row))
        else:
            print(f"{path}\t{answer[0]}\t{answer[1]:.4f}")
    if failed and len(files) == 1:  # its line above says it all
        return 1
    if failed:
        raise TlpipeError(f"{failed} of {len(files)} images could not be classified (see above)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    model = _load(args, args.model)
    r = bench(model, args.batch, args.runs, args.warmup)
    if args.json:
        print(json.dumps({**r, "provider": model.providers[0]}))
        return 0
    print(f"{model.path}  provider={model.providers[0]}  batch={args.batch}  runs={args.runs}")
    print(f"latency ms: p50 {r['p50_ms']:.3f}  p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f}")
    print(f"throughput: {r['images_per_s']:.1f} images/s")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    model = _load(args, args.model)
    first = [*REQUIRED_METADATA, "precision", "arch", "model_version", "dataset_sha256"]
    keys = [k for k in first if k in model.metadata]
    keys += sorted(set(model.metadata) - set(keys))
    info = {
        "path": str(model.path),
        "size_bytes": model.path.stat().st_size,
        "providers": model.providers,
        **{k: model.metadata[k] for k in keys},
    }
    if not args.model:
        store = ModelStore(args.model_dir)
        info["installed"], info["previous"] = str(store.current()), str(store.previous())
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    registry = Registry(args.tracking_uri, timeout=args.timeout, deadline=args.deadline)
    result = pull(
        ModelStore(args.model_dir), registry, args.name, args.alias, args.variant, args.force
    )
    print(result.message)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    store = ModelStore(args.model_dir)
    with store.lock():
        now, was = store.rollback()
    print(f"rolled back to {now} (from {was}; `pull` will not reinstall it unless --force)")
    return 0


def _add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument(
            "model",
            nargs="?",
            metavar="MODEL.onnx",
            help="an ONNX file (default: the model directory's current model)",
        )
    p.add_argument(
        "--provider",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="execution provider (default: CUDA if available, else CPU)",
    )
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = auto)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tlpipe-edge",
        description="Serve a tlpipe-exported ONNX classifier with onnxruntime (no torch, no "
        "mlflow): `pull` installs the registry's champion into a model directory, `predict` "
        "and `bench` serve it (or an explicit model.onnx).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model-dir",
        type=Path,
        default=default_model_dir(),
        help=f"installed models (default: ${MODEL_DIR_ENV} or ~/.local/share/tlpipe-edge)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    pr = sub.add_parser(
        "predict",
        parents=[common],
        help="classify images",
        description="Print one line per image: path, label, probability. A file "
        "that cannot be read is reported on stderr; the others are classified.",
    )
    pr.add_argument(
        "images",
        nargs="+",
        metavar="[MODEL.onnx] IMAGE_OR_DIR",
        help="an optional ONNX file, then images or directories (recursive)",
    )
    _add_model_args(pr, positional=False)
    pr.add_argument("--batch-size", type=int, default=64, help="images per inference call")
    pr.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images before decoding (default {DEFAULT_MAX_PIXELS})",
    )
    pr.set_defaults(func=_cmd_predict)

    be = sub.add_parser(
        "bench",
        parents=[common],
        help="measure inference latency",
        description="Time inference on random images: p50/p90/p99 latency and "
        "throughput (preprocessing excluded).",
    )
    _add_model_args(be)
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
    _add_model_args(info)
    info.set_defaults(func=_cmd_info)

    _add_registry_commands(sub, common)
    return p


def _add_registry_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """`pull` and `rollback`: the model directory follows the registry."""
    pu = sub.add_parser(
        "pull",
        parents=[common],
        help="install the registry's champion",
        description="Fetch NAME@ALIAS from the MLflow server "
        "($MLFLOW_TRACKING_URI; credentials from MLFLOW_TRACKING_USERNAME/"
        "PASSWORD or MLFLOW_TRACKING_TOKEN), check its sha256 against the one "
        "recorded at registration, and swap it in; no-op when unchanged.",
    )
    pu.add_argument("--name", default="tlpipe", help="registered model (default tlpipe)")
    pu.add_argument("--alias", default="champion", help="alias to follow (default champion)")
    pu.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default="fp32",
        help="which ONNX file (default fp32; int8 is the quantised one)",
    )
    pu.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    pu.add_argument("--timeout", type=float, default=30.0, help="seconds per read")
    pu.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        help="seconds the whole pull may take (default 600), however slowly the server sends",
    )
    pu.add_argument("--force", action="store_true", help="install even if unchanged or rolled back")
    pu.set_defaults(func=_cmd_pull)

    rb = sub.add_parser(
        "rollback",
        parents=[common],
        help="return to the previous model",
        description="Swap the current and the previous model.",
    )
    rb.set_defaults(func=_cmd_rollback)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tlpipe-edge`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        keys = ("batch_size", "batch", "runs", "max_pixels", "timeout", "deadline")
        sizes = [getattr(args, k, 1) for k in keys]
        if getattr(args, "threads", 0) < 0 or min(sizes) < 1:
            raise TlpipeError(
                "--threads must be ≥ 0; --batch, --batch-size, --runs and --max-pixels ≥ 1; "
                "--timeout and --deadline ≥ 1 s"
            )
        return args.func(args)
    except TlpipeError as e:
        print(f"tlpipe-edge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tlpipe-edge predict … | head`
        sys.stderr.close()
        return 0
