"""The export step: ONNX + INT8 files, metadata, dynamic batch, parity report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import tlpipe
from tlpipe.data.manifest import Manifest, load_manifest
from tlpipe.data.prepared import load_split
from tlpipe.errors import TlpipeError
from tlpipe.fsio import sha256_file
from tlpipe.params import fields
from tlpipe.steps import export
from tlpipe.train.checkpoint import CheckpointMeta
from tlpipe.train.loop import predict
from tlpipe.train.models import build_model, save_checkpoint


def _checkpoint(path: Path, manifest: Manifest, classes: list[str] | None = None) -> Path:
    """A random-weight small_cnn saved with the contract's meta fields."""
    torch.manual_seed(0)
    classes = classes or manifest.target_classes
    meta = CheckpointMeta(
        arch="small_cnn",
        in_chans=1,
        input_size=28,
        classes=tuple(classes),
        mean=manifest.mean,
        std=manifest.std,
        strategy="full",
        dataset_sha256=manifest.dataset_sha256,
    )
    return save_checkpoint(path, build_model("small_cnn", len(classes)), meta)


@pytest.fixture(scope="module")
def model_path(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("export") / "m.pt", load_manifest(tiny_prepared))


@pytest.fixture(scope="module")
def exported(tiny_prepared: Path, model_path: Path) -> export.ExportResult:
    # a random-weight model: INT8 published whatever its agreement (the thresholds have a test)
    cfg = export.ExportConfig(int8_min_agreement=0.0, int8_max_accuracy_drop=100.0)
    return export.run(model_path, tiny_prepared, model_path.parent / "export", cfg)


def test_export_passes_parity_and_writes_the_contract_files(exported, tiny_prepared):
    out = exported.onnx_path.parent
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx", "model.onnx", "parity.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    parity = json.loads(exported.parity_path.read_text())
    assert parity["passed"] is True and exported.passed
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] >= 0.999
    assert parity["test_sha256"] == load_manifest(tiny_prepared).splits["target_test"].sha256
    fp32, int8 = parity["fp32"], parity["int8"]
    assert fp32["size_bytes"] == exported.onnx_path.stat().st_size
    assert int8["size_bytes"] < 0.3 * fp32["size_bytes"]
    assert 0 <= int8["accuracy"] <= 1 and fp32["accuracy"] == parity["torch"]["accuracy"]
    # tiny_prepared has under 500 target images: every val/train image calibrates
    splits = load_manifest(tiny_prepared).splits
    assert int8["calibration"] == {n: splits[n].count for n in ("target_val", "target_train")}
    assert exported.metrics["parity_passed"] == 1.0
    assert exported.metrics["int8_size_ratio"] == pytest.approx(int8["size_ratio"])


def test_metadata_carries_everything_the_edge_needs(exported, model_path, tiny_prepared):
    manifest = load_manifest(tiny_prepared)
    for path, precision in ((exported.onnx_path, "fp32"), (exported.int8_path, "int8")):
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["classes"]) == list(manifest.target_classes)
        assert json.loads(props["input_shape"]) == [1, 28, 28]
        assert json.loads(props["mean"]) == pytest.approx(manifest.mean)
        assert json.loads(props["std"]) == pytest.approx(manifest.std)
        assert props["model_version"] == sha256_file(model_path)[:12]
        assert props["dataset_sha256"] == manifest.dataset_sha256
        assert props["tlpipe_version"] == tlpipe.__version__
        assert props["precision"] == precision
        assert [i.name for i in model.graph.input] == ["input"]
        assert [o.name for o in model.graph.output] == ["logits"]


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_matches_torch(exported, model_path, tiny_prepared, batch):
    from tlpipe.train.models import load_checkpoint

    model, meta = load_checkpoint(model_path)
    x = load_split(tiny_prepared, "target_test").x[:batch]
    ref = predict(model, x, meta.mean, meta.std)
    xn = export.normalise(x, meta.mean, meta.std)
    for path in (exported.onnx_path, exported.int8_path):
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"input": xn}
        )[0]
        assert out.shape == (batch, 5)
    np.testing.assert_allclose(export.ort_logits(exported.onnx_path, xn), ref, atol=1e-4)


def test_parity_failure_is_reported_not_raised(tiny_prepared, model_path, tmp_path):
    cfg = fields.build(export.ExportConfig, {"tolerance": 1e-12, "int8": False})
    result = export.run(model_path, tiny_prepared, tmp_path / "export", cfg)
    parity = json.loads(result.parity_path.read_text())
    assert parity["passed"] is False and result.passed is False
    assert parity["max_abs_diff"] > 1e-12 and parity["int8"] is None
    assert result.int8_path is None and not (tmp_path / "export" / "model.int8.onnx").exists()
    assert result.metrics["parity_passed"] == 0.0


def test_wrong_classes_fail_cleanly_and_leave_nothing(tiny_prepared, tmp_path):
    bad = _checkpoint(tmp_path / "src.pt", load_manifest(tiny_prepared), ["a", "b", "c"])
    with pytest.raises(TlpipeError, match="not the target classes"):
        export.run(bad, tiny_prepared, tmp_path / "export", export.ExportConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]


@pytest.mark.parametrize(
    "values, match",
    [
        ({"opset": 17}, "opset"),
        ({"calibration_splits": ["target_test"]}, "calibration_splits"),
        ({"min_agreement": 1.5}, "min_agreement"),
        ({"int8_min_agreement": 1.5}, "int8_min_agreement"),
        ({"int8_max_accuracy_drop": -1}, "int8_max_accuracy_drop"),
        ({"int8_method": "fast"}, "int8_method"),
        ({"calibration_method": "magic"}, "calibration_method"),
    ],
)
def test_bad_config_is_a_user_error(values, match):
    with pytest.raises(TlpipeError, match=match):
        fields.build(export.ExportConfig, values)


def test_edge_runtime_serves_the_exported_model(exported, model_path, tiny_prepared):
    from tlpipe.edge import EdgeModel
    from tlpipe.train.models import load_checkpoint

    model, meta = load_checkpoint(model_path)
    x = load_split(tiny_prepared, "target_test").x[:10]
    want = [meta.classes[i] for i in predict(model, x, meta.mean, meta.std).argmax(1)]
    edge = EdgeModel(exported.onnx_path, provider="cpu")
    assert [label for label, _ in edge.predict(x)] == want
    assert [label for label, _ in edge.predict(list(x))] == want  # one (C, H, W) array each


def test_int8_keeps_first_conv_and_head_in_float(exported):
    model = onnx.load(str(exported.int8_path))
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    float_weights = [n.op_type for n in convs if n.input[1] not in dequantized]
    assert float_weights == ["Conv", "Gemm"] and convs[0].op_type == "Conv"
    assert len(convs) == 8  # small_cnn: 7 convs + the head


def test_calibration_tops_up_from_later_splits(tiny_prepared):
    splits = ("target_val", "source_val")
    cfg = export.ExportConfig(calibration_images=30, calibration_splits=splits)
    x, counts = export.calibration_set(tiny_prepared, cfg)
    assert counts == {"target_val": 25, "source_val": 5} and x.shape == (30, 1, 28, 28)


def _near_tie(path: Path, model_path: Path) -> Path:
    """The model with its head rows almost equal and centred: test images sit next to decision
    boundaries, where INT8's rounding flips the argmax."""
    from tlpipe.train.models import load_checkpoint

    model, meta = load_checkpoint(model_path)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        w = model.head.weight
        w.copy_(1e-2 * torch.randn_like(w))
        model.head.bias.zero_()
    return save_checkpoint(path, model, meta)


def test_int8_is_published_only_when_it_passes_its_own_parity(tiny_prepared, model_path, tmp_path):
    # one calibration image: activation ranges far too narrow, so INT8 clips and disagrees
    tied = _near_tie(tmp_path / "tied.pt", model_path)
    starved = export.ExportConfig(calibration_images=1)
    result = export.run(tied, tiny_prepared, tmp_path / "export", starved)
    int8 = json.loads(result.parity_path.read_text())["int8"]
    assert int8["argmax_agreement"] < 0.99  # the premise: this INT8 disagrees with fp32
    assert int8["published"] is False and "argmax agreement with fp32" in int8["reason"]
    assert result.int8_path is None and not (tmp_path / "export" / "model.int8.onnx").exists()
    assert result.passed and "INT8 NOT published" in result.summary  # fp32 still ships
    assert result.metrics["int8_published"] == 0.0 and int8["method"] == "static"
    lenient = export.ExportConfig(
        calibration_images=1, int8_min_agreement=0.0, int8_max_accuracy_drop=100.0
    )
    result = export.run(tied, tiny_prepared, tmp_path / "lenient", lenient)
    int8 = json.loads(result.parity_path.read_text())["int8"]
    assert int8["published"] is True and result.int8_path.is_file()


def test_int8_verdict_names_each_threshold_missed() -> None:
    cfg = export.ExportConfig(int8_min_agreement=0.99, int8_max_accuracy_drop=1.0)
    fp32 = {"accuracy": 0.90}
    ok = export.int8_verdict({"argmax_agreement": 0.995, "accuracy": 0.895}, fp32, cfg)
    assert ok["published"] is True
    bad = export.int8_verdict({"argmax_agreement": 0.83, "accuracy": 0.85}, fp32, cfg)
    assert bad["published"] is False
    assert "0.8300 < export.int8_min_agreement 0.99" in bad["reason"]
    assert "accuracy drop 5.00 pt > export.int8_max_accuracy_drop 1.0" in bad["reason"]


def test_dynamic_int8_needs_no_calibration(tiny_prepared, model_path, tmp_path) -> None:
    cfg = export.ExportConfig(
        int8_method="dynamic", int8_min_agreement=0.0, int8_max_accuracy_drop=100.0
    )
    result = export.run(model_path, tiny_prepared, tmp_path / "export", cfg)
    int8 = json.loads(result.parity_path.read_text())["int8"]
    assert int8["method"] == "dynamic" and int8["calibration"] == {}
    ops = {n.op_type for n in onnx.load(str(result.int8_path)).graph.node}
    assert "ConvInteger" in ops or "DynamicQuantizeLinear" in ops
