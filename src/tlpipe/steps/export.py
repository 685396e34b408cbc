"""Step 6: export the chosen model to ONNX (fp32 and INT8) and prove the fp32 file matches torch.

The exported graph takes `input`, float32 (N, C, H, W) *already normalised*, with a dynamic
batch axis, and returns `logits`. Everything an edge device needs to serve it (class names,
input shape, mean/std, versions) rides along in the ONNX metadata_props, so `tlpipe.edge` can
run it with onnxruntime + numpy + pillow alone.

Exporter: the torch.export-based one (`dynamo=True`), the default since torch 2.9. It folds
BatchNorm into the convolutions and gives a clean graph for every registered model; the legacy
TorchScript exporter is deprecated. Its lowest implemented opset is 18, hence the default.

Parity is measured on the target *test* images (CPU execution provider, the edge runtime's
default): max |Δlogit| and argmax agreement against the torch model. A failed parity check is
reported (`passed: false` in parity.json), not raised: the register step's gate reads it.
INT8 is ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations),
calibrated on (unlabelled) target validation and training images. uint8 activations × int8
weights (U8S8) is the kernel ONNX Runtime's x86 CPU provider is fast with (VPMADDUBSW / VNNI);
signed int8 activations fall to a slower path, where INT8 can be slower than fp32. Source images
can be added (`calibration_splits`) but widen the activation ranges when the target domain is
shifted. INT8 has its own parity (agreement with fp32 and accuracy drop on the test split) and
is published only when it passes `int8_min_agreement` and `int8_max_accuracy_drop`; otherwise
the file is not written and parity.json's `int8.reason` says why (fp32 still ships).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlpipe.errors import TlpipeError
from tlpipe.params import Calibration, ExportConfig
from tlpipe.steps import StepResult

if TYPE_CHECKING:
    from tlpipe.data.manifest import Manifest
    from tlpipe.train.checkpoint import CheckpointMeta


@dataclass(frozen=True)
class ExportResult(StepResult):
    onnx_path: Path
    int8_path: Path | None
    parity_path: Path
    passed: bool


def run(model_path: Path, prepared_dir: Path, out_dir: Path, cfg: ExportConfig) -> ExportResult:
    """Write `model.onnx`, `model.int8.onnx` (if `cfg.int8`) and `parity.json` into `out_dir`."""
    from tlpipe.data.manifest import load_manifest
    from tlpipe.data.prepared import load_split
    from tlpipe.edge.model import EdgeModel
    from tlpipe.fsio import atomic_path, write_json
    from tlpipe.train.loop import predict
    from tlpipe.train.models import load_checkpoint

    model, meta = load_checkpoint(model_path)
    manifest = load_manifest(prepared_dir)
    test = load_split(prepared_dir, "target_test")
    _check_compatible(meta, manifest, test.x, model_path)
    mean, std = meta.mean, meta.std
    x_test = normalise(test.x, mean, std)
    reference = predict(model, test.x, mean, std, batch_size=cfg.batch_size)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        export_onnx(model, tmp / "model.onnx", x_test.shape[1:], cfg.opset)
        set_metadata(tmp / "model.onnx", _metadata(meta, manifest, model_path, cfg, "fp32"))
        EdgeModel(tmp / "model.onnx", provider="cpu")  # what a device checks, before it is written
        fp32 = ort_logits(tmp / "model.onnx", x_test, cfg.batch_size)
        report = _parity_report(reference, fp32, test.y, cfg)
        report["fp32"] = _variant_report(tmp / "model.onnx", fp32, reference, test.y)
        report["int8"] = None
        if cfg.int8:
            int8_path = tmp / "model.int8.onnx"
            counts = {}
            if cfg.int8_method == "static":
                calib, counts = calibration_set(prepared_dir, cfg)
                quantize_int8(
                    tmp / "model.onnx",
                    int8_path,
                    normalise(calib, mean, std),
                    cfg.calibration_method,
                    cfg.fp32_first_last,
                )
            else:
                quantize_dynamic_int8(tmp / "model.onnx", int8_path)
            set_metadata(int8_path, _metadata(meta, manifest, model_path, cfg, "int8"))
            EdgeModel(int8_path, provider="cpu")
            int8 = ort_logits(int8_path, x_test, cfg.batch_size)
            report["int8"] = _variant_report(int8_path, int8, reference, test.y)
            report["int8"] |= {"method": cfg.int8_method, "calibration": counts}
            _add_int8_deltas(report)
            report["int8"] |= int8_verdict(report["int8"], report["fp32"], cfg)
            if not report["int8"]["published"]:
                int8_path.unlink()
        report["test_sha256"] = manifest.splits["target_test"].sha256
        report["dataset_sha256"] = manifest.dataset_sha256
        write_json(tmp / "parity.json", report)
    published = bool(report["int8"] and report["int8"]["published"])
    return ExportResult(
        onnx_path=out_dir / "model.onnx",
        int8_path=out_dir / "model.int8.onnx" if published else None,
        parity_path=out_dir / "parity.json",
        passed=report["passed"],
        metrics=_summary(report),
        artifacts=(out_dir / "parity.json",),
        summary=f"wrote {out_dir}: parity {'passed' if report['passed'] else 'FAILED'}; "
        f"{_int8_line(report['int8'])}; {_summary(report)}",
    )


# ---------------------------------------------------------------------------- export


def export_onnx(model: Any, path: Path, input_shape: tuple[int, ...], opset: int = 18) -> Path:
    """Export a torch module with a dynamic batch axis (`input` → `logits`) and check it."""
    import onnx
    import torch

    # batch 2 in the example: torch.export specialises a dimension of size 1 to a constant
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    try:
        program = torch.onnx.export(
            model.eval(),
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    except Exception as e:  # noqa: BLE001 — exporter failures are many and varied
        raise TlpipeError(f"ONNX export failed ({type(e).__name__}: {e})") from e
    proto = program.model_proto
    # 1) drop per-node debug info (module paths, stack traces): ~2 kB a node, a fifth of INT8
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return Path(path)


def set_metadata(path: Path, props: dict[str, str]) -> None:
    """Add/replace metadata_props of an ONNX file in place, then re-check it."""
    import onnx

    model = onnx.load(str(path))
    keep = {p.key: p.value for p in model.metadata_props if p.key not in props}
    onnx.helper.set_model_props(model, {**keep, **props})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _metadata(
    meta: CheckpointMeta, manifest: Manifest, model_path: Path, cfg: ExportConfig, precision
) -> dict[str, str]:
    """The ONNX file's metadata_props: what the edge runtime reads (`tlpipe.edge.model`)."""
    import tlpipe
    from tlpipe.fsio import sha256_file

    return {
        "classes": json.dumps(list(meta.classes)),
        "input_shape": json.dumps(list(meta.input_shape)),
        "mean": json.dumps([float(v) for v in meta.mean]),
        "std": json.dumps([float(v) for v in meta.std]),
        "model_version": cfg.model_version or sha256_file(model_path)[:12],
        "dataset_sha256": meta.dataset_sha256 or manifest.dataset_sha256,
        "tlpipe_version": tlpipe.__version__,
        "arch": str(meta.arch),
        "precision": precision,
    }


def _check_compatible(
    meta: CheckpointMeta, manifest: Manifest, x: np.ndarray, model_path: Path
) -> None:
    if len(x) == 0:
        raise TlpipeError("the target test split is empty: nothing to check parity on")
    if list(meta.classes) != list(manifest.target_classes):
        raise TlpipeError(
            f"{model_path} predicts {list(meta.classes)}, not the target classes "
            f"{list(manifest.target_classes)}: export a fine-tuned model"
        )
    shape = meta.input_shape
    if tuple(x.shape[1:]) != shape:
        raise TlpipeError(
            f"{model_path} takes {shape} images, the prepared data has "
            f"{tuple(x.shape[1:])}: re-run prepare/finetune"
        )


# ---------------------------------------------------------------------------- INT8


def quantize_int8(
    fp32: Path,
    out: Path,
    calib: np.ndarray,
    method: Calibration = "minmax",
    fp32_first_last: bool = True,
) -> Path:
    """Static QDQ quantization (per-channel int8 weights, uint8 activations) of an ONNX file.

    Args:
        calib: Normalised float32 calibration images (N, C, H, W).
        fp32_first_last: Leave the first Conv and the classifier in float (see ExportConfig).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # histogram methods fail on batches of unequal size (onnxruntime 1.32): feed one at a time
    step = 64 if method == "minmax" else 1

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib[i : i + step] for i in range(0, len(calib), step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    # 1) shape inference + graph fusions first, as ONNX Runtime recommends before quantizing
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    keep = _first_and_last(onnx.load(str(pre))) if fp32_first_last else []
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,  # U8S8: see the top
        calibrate_method=methods[method],
        nodes_to_exclude=keep,
    )
    pre.unlink()
    return out


def quantize_dynamic_int8(fp32: Path, out: Path) -> Path:
    """Dynamic quantization: int8 weights, activations quantized per call (no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    # ConvInteger (the dynamic Conv) has uint8 × uint8 kernels only in ONNX Runtime's CPU EP
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QUInt8)
    pre.unlink()
    return out


def int8_verdict(int8: dict, fp32: dict, cfg: ExportConfig) -> dict[str, Any]:
    """Whether the INT8 file is published: its own parity against fp32 on the test split."""
    drop = 100 * (fp32["accuracy"] - int8["accuracy"])
    failures = []
    if int8["argmax_agreement"] < cfg.int8_min_agreement:
        failures.append(
            f"argmax agreement with fp32 {int8['argmax_agreement']:.4f} < "
            f"export.int8_min_agreement {cfg.int8_min_agreement}"
        )
    if drop > cfg.int8_max_accuracy_drop:
        failures.append(
            f"accuracy drop {drop:.2f} pt > export.int8_max_accuracy_drop "
            f"{cfg.int8_max_accuracy_drop}"
        )
    return {
        "published": not failures,
        "reason": "; ".join(failures) or "passed the INT8 thresholds",
        "min_agreement": cfg.int8_min_agreement,
        "max_accuracy_drop_points": cfg.int8_max_accuracy_drop,
    }


def _int8_line(int8: dict | None) -> str:
    if int8 is None:
        return "no INT8 (export.int8 false)"
    if int8["published"]:
        return f"INT8 published (agreement {int8['argmax_agreement']:.4f})"
    return f"INT8 NOT published: {int8['reason']}"


def _first_and_last(model: Any) -> list[str]:
    """Names of the first Conv node and of the node producing `logits` (nodes are in order)."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    head = [n.name for n in model.graph.node if "logits" in n.output]
    return convs[:1] + head


def calibration_set(prepared_dir: Path, cfg: ExportConfig) -> tuple[np.ndarray, dict]:
    """Up to `calibration_images` images, taken from `calibration_splits` in order (shuffled)."""
    from tlpipe.data.prepared import load_split

    rng = np.random.default_rng(0)
    parts, counts, missing = [], {}, cfg.calibration_images
    for name in cfg.calibration_splits:
        if missing == 0:
            break
        x = load_split(prepared_dir, name).x
        parts.append(x[rng.permutation(len(x))[:missing]])
        counts[name] = len(parts[-1])
        missing -= counts[name]
    if missing == cfg.calibration_images:
        raise TlpipeError(
            f"no calibration images in {', '.join(cfg.calibration_splits)}: set "
            "export.int8=false or export.calibration_splits"
        )
    return np.concatenate(parts), counts


# ---------------------------------------------------------------------------- measuring


def normalise(x: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N,C,H,W) → float32 `(x/255 - mean)/std`, bit-identical to `training.to_input`."""
    import torch

    from tlpipe.train.loop import to_input

    return to_input(torch.tensor(x), mean, std).numpy()  # a copy: x may be a read-only mmap


def ort_logits(path: Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run an ONNX file on CPU over normalised images, in batches."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [
        sess.run(["logits"], {"input": x[i : i + batch_size]})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs)


def _parity_report(ref: np.ndarray, out: np.ndarray, y: np.ndarray, cfg: ExportConfig) -> dict:
    max_diff = float(np.abs(ref - out).max())
    agreement = float((ref.argmax(1) == out.argmax(1)).mean())
    return {
        "passed": bool(max_diff <= cfg.tolerance and agreement >= cfg.min_agreement),
        "max_abs_diff": max_diff,
        "argmax_agreement": agreement,
        "tolerance": cfg.tolerance,
        "min_agreement": cfg.min_agreement,
        "count": len(y),
        "opset": cfg.opset,
        "provider": "CPUExecutionProvider",
        "torch": {"accuracy": float((ref.argmax(1) == y).mean())},
    }


def _variant_report(path: Path, out: np.ndarray, ref: np.ndarray, y: np.ndarray) -> dict:
    return {
        "accuracy": float((out.argmax(1) == y).mean()),
        "size_bytes": os.path.getsize(path),
        "max_abs_diff": float(np.abs(ref - out).max()),
        "argmax_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
    }


def _add_int8_deltas(report: dict) -> None:
    fp32, int8 = report["fp32"], report["int8"]
    int8["size_ratio"] = int8["size_bytes"] / fp32["size_bytes"]
    int8["accuracy_delta_points"] = round(100 * (int8["accuracy"] - fp32["accuracy"]), 4)


def _summary(report: dict) -> dict[str, float]:
    out = {
        "parity_passed": float(report["passed"]),
        "max_abs_diff": report["max_abs_diff"],
        "argmax_agreement": report["argmax_agreement"],
        "fp32_accuracy": report["fp32"]["accuracy"],
        "fp32_size_bytes": float(report["fp32"]["size_bytes"]),
    }
    if report["int8"] is not None:
        i8 = report["int8"]
        out |= {
            "int8_accuracy": i8["accuracy"],
            "int8_size_bytes": float(i8["size_bytes"]),
            "int8_size_ratio": i8["size_ratio"],
            "int8_accuracy_delta_points": i8["accuracy_delta_points"],
            "int8_argmax_agreement": i8["argmax_agreement"],
            "int8_published": float(i8["published"]),
        }
    return out
