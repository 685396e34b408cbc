"""The torch-free edge runtime and its CLI, on small hand-built ONNX classifiers.

The test model is "dark vs bright": logits are ± the mean normalised pixel, so what it should
answer for a white or a black image is known. (test_export.py runs the edge runtime on a real
exported CNN.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tlpipe import edge
from tlpipe.errors import TlpipeError

ROOT = Path(__file__).resolve().parents[1]


def write_model(path: Path, channels: int = 1, size: int = 8, version: str = "test") -> Path:
    """A Flatten → Gemm classifier: class 1 ("bright") when the mean normalised pixel is > 0."""
    n = channels * size * size
    w = np.stack([-np.ones(n), np.ones(n)], axis=1).astype(np.float32) * 4 / n
    shape = [channels, size, size]
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *shape])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])]
    b = np.zeros(2, np.float32)
    weights = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph(nodes, "dark_bright", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    helper.set_model_props(
        model,
        {
            "classes": json.dumps(["dark", "bright"]),
            "input_shape": json.dumps(shape),
            "mean": json.dumps([0.5] * channels),
            "std": json.dumps([0.25] * channels),
            "model_version": version,
            "precision": "fp32",
        },
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("edge") / "model.onnx")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """white.png (RGB 30×20), black.png (grey 8×8), sub/grey.jpg, and a non-image file."""
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (30, 20), (255, 255, 255)).save(root / "white.png")
    Image.new("L", (8, 8), 0).save(root / "black.png")
    (root / "sub").mkdir()
    Image.new("L", (16, 16), 230).save(root / "sub" / "grey.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "tlpipe-edge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tlpipe.edge"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)


def test_cli_predict_prints_one_line_per_image(model_file, images):
    proc = _cli("predict", str(model_file), str(images))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    got = {Path(path).name: (label, float(prob)) for path, label, prob in rows}
    assert set(got) == {"black.png", "white.png", "grey.jpg"}  # notes.txt skipped
    assert got["white.png"][0] == "bright" and got["black.png"][0] == "dark"
    assert got["grey.jpg"][0] == "bright" and all(0.5 < p <= 1 for _, p in got.values())

    proc = _cli("predict", "--json", str(model_file), str(images / "black.png"))
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["label"] == "dark" and row["path"].endswith("black.png") and row["probability"] > 0.9


def test_cli_bad_model_file_is_one_line_no_traceback(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"this is not onnx")
    proc = _cli("info", str(tmp_path / "bad.onnx"))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("tlpipe-edge: error:") and "bad.onnx" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "{tmp}/missing.onnx"], "not found"),
        (["info", "{tmp}/plain.onnx"], "lacks tlpipe metadata"),
        (["predict", "{model}", "{tmp}/nothing.png"], "not found"),
        (["predict", "--model-dir", "{tmp}/none", "{images}"], "no model installed"),
        (["predict", "{model}", "{images}", "--max-pixels", "0"], "--max-pixels"),
        (["info", "models:/tlpipe@champion"], "tlpipe-edge pull"),
        (["rollback", "--model-dir", "{tmp}/none"], "nothing to roll back"),
        (["pull", "--model-dir", "{tmp}/d", "--tracking-uri", "sqlite:///x.db"], "http(s)://"),
        (["predict", "{model}", "{tmp}"], "holds no images"),
        (["bench", "{model}", "--runs", "0"], "--runs"),
    ],
)
def test_cli_user_errors(args, message, model_file, images, tmp_path, capsys):
    plain = onnx.load(str(model_file))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    args = [a.format(tmp=tmp_path, model=model_file, images=images) for a in args]
    assert edge.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("tlpipe-edge: error:") and message in err and err.count("\n") == 1


def test_info_and_bench(model_file, capsys):
    assert edge.main(["info", "--json", str(model_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == '["dark", "bright"]' and info["input_shape"] == "[1, 8, 8]"
    assert info["providers"] == ["CPUExecutionProvider"]
    assert (
        edge.main(["bench", str(model_file), "--batch", "4", "--runs", "5", "--warmup", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert "p50" in out and "p99" in out and "images/s" in out


def test_importing_and_predicting_never_imports_torch_or_mlflow(model_file, images):
    code = (
        "import sys, tlpipe.edge as e\n"
        f"m = e.EdgeModel({str(model_file)!r})\n"
        f"assert m.predict([{str(images / 'white.png')!r}])[0][0] == 'bright'\n"
        "import tlpipe.edge.commands, tlpipe.edge.pull, tlpipe.edge.rest_client\n"
        "import tlpipe.edge.store\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'mlflow')]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_every_input_kind_gives_the_same_pixels(model_file, images):
    from tlpipe.data.image_files import load_image

    m = edge.EdgeModel(model_file)
    path = images / "white.png"
    ref, _size = load_image(path, 1, 8)  # the pipeline's own image loader
    with Image.open(path) as img:
        pil = img.copy()
    hwc = np.asarray(pil)  # (20, 30, 3)
    for item in (path, str(path), pil, hwc, ref, ref[0]):
        np.testing.assert_array_equal(m.to_uint8(item), ref[None])
    assert m.to_uint8(np.stack([ref, ref])).shape == (2, 1, 8, 8)
    assert m.to_uint8(np.zeros((1, 16, 12), np.uint8)).shape == (1, 1, 8, 8)  # CHW, resized
    assert m.predict([]) == []
    sure = pytest.approx(1, abs=1e-3)
    assert m.predict(np.stack([ref, 255 - ref])) == [("bright", sure), ("dark", sure)]
    with pytest.raises(TlpipeError, match="uint8"):
        m.predict(ref.astype(np.float32))


def test_rgb_model_converts_grey_images(tmp_path, images):
    m = edge.EdgeModel(write_model(tmp_path / "rgb.onnx", channels=3, size=5))
    assert m.to_uint8(images / "black.png").shape == (1, 3, 5, 5)
    assert [label for label, _ in m.predict([images / "black.png", images / "white.png"])] == [
        "dark",
        "bright",
    ]


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_stays_close_to_a_full_decode(
    tmp_path, model_file
):
    """libjpeg decodes a photo of 8× the output size at 1/8 scale (the opened image shrinks
    to 250×188 before the resize); the pixels stay within a few levels of a full decode, and
    prepare's reader and the edge give the same ones."""
    from tlpipe.data.image_files import load_image
    from tlpipe.pixels import to_chw

    y, x = np.mgrid[0:1500, 0:2000]
    field = 128 + 100 * np.sin(x / 90) * np.cos(y / 70)
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.stack([field] * 3, -1).astype(np.uint8)).save(path, quality=90)
    with Image.open(path) as img:
        ours = to_chw(img, 3, 64, 64)
        assert img.size == (250, 188)  # drafted: 2000×1500 / 8
    with Image.open(path) as img:
        full = np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    diff = np.abs(ours.transpose(1, 2, 0).astype(int) - full.astype(int))
    assert diff.mean() < 2 and diff.max() <= 12, (diff.mean(), diff.max())
    np.testing.assert_array_equal(load_image(path, 3, 64)[0], ours)
    grey = load_image(path, 1, 8)[0]
    m = edge.EdgeModel(model_file)
    np.testing.assert_array_equal(m.to_uint8(path), grey[None])
    with Image.open(path) as img:  # a caller's own image is left as it was: not drafted
        near = m.to_uint8(img)[0]
        assert img.size == (2000, 1500)
    assert np.abs(near.astype(int) - grey.astype(int)).max() <= 12


def test_16_bit_and_rotated_photos_give_the_pixels_a_viewer_shows_in_training_and_on_the_edge(
    tmp_path, model_file
):
    """16-bit PNGs are scaled to 8 bits (PIL alone clips them to white), a JPEG stored
    sideways with an EXIF Orientation tag is turned upright, and prepare's reader and the edge
    runtime give the same pixels for both; a float image with no 8-bit scale is refused."""
    from tlpipe.data.image_files import load_image, read_imagefolder

    ramp = np.linspace(0, 65535, 8 * 8).reshape(8, 8).astype(np.uint16)
    deep = tmp_path / "data" / "deep" / "ramp16.png"
    deep.parent.mkdir(parents=True)
    Image.fromarray(ramp).save(deep)
    assert Image.open(deep).mode.startswith("I;16")
    want = np.rint(ramp / 257).astype(np.uint8)
    pixels, _ = load_image(deep, 1, 8)
    np.testing.assert_array_equal(pixels[0], want)  # was 255 in 63 of 64 pixels

    upright = np.zeros((16, 24), np.uint8)
    upright[:8] = 255  # top half white: the photo as taken
    turned = tmp_path / "data" / "turned" / "phone.jpg"
    turned.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    Image.fromarray(np.rot90(upright, 1)).save(turned, exif=exif, quality=95)  # stored sideways
    pixels, _ = load_image(turned, 1, 8)
    assert pixels[0, :4].mean() > 200 and pixels[0, 4:].mean() < 50, pixels[0]

    raw = read_imagefolder(tmp_path / "data", channels=1, input_size=8)
    m = edge.EdgeModel(model_file)
    for path in (deep, turned):
        (row,) = [i for i, c in enumerate(raw.classes) if c == path.parent.name]
        got = np.asarray(raw.x[raw.y == row][0])
        np.testing.assert_array_equal(got, load_image(path, 1, 8)[0])
        np.testing.assert_array_equal(m.to_uint8(path)[0], got)  # the edge sees the same
        with Image.open(path) as img:  # a caller's image: upright and scaled too (not drafted)
            mine = m.to_uint8(img)[0]
        if path == deep:  # a PNG has no draft: the same pixels
            np.testing.assert_array_equal(mine, got)
        else:
            assert mine[0, :4].mean() > 200 and mine[0, 4:].mean() < 50, mine

    far = tmp_path / "far.tiff"
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(far)
    with pytest.raises(TlpipeError, match=r"far.tiff: not a readable image .*outside 0 … 1\.0"):
        load_image(far, 1, 8)
    with pytest.raises(TlpipeError, match=r"far.tiff: not a readable image .*outside 0 … 1\.0"):
        m.to_uint8(far)
    unit = tmp_path / "unit.tiff"
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(unit)
    assert load_image(unit, 1, 8)[0].min() == 128 == m.to_uint8(unit).max()
    with Image.open(far) as img, pytest.raises(TlpipeError, match="outside 0 … 1.0"):
        m.to_uint8(img)  # the caller's own image object: the same one-line refusal
    cut = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    Image.fromarray(noise).save(cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # header whole, data cut off
    with Image.open(cut) as img, pytest.raises(TlpipeError, match="cannot read the image"):
        m.to_uint8(img)  # decoded only now: PIL's OSError is one line, not a traceback


def test_providers():
    import onnxruntime as ort

    assert edge.select_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert edge.select_providers("auto")[0] == "CUDAExecutionProvider"
    else:
        assert edge.select_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(TlpipeError, match="onnxruntime-gpu"):
            edge.select_providers("cuda")


def test_base_and_edge_dependencies_have_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["edge"]
    names = {
        d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
        for d in deps
    }
    assert "onnxruntime" in names and "numpy" in names and "pillow" in names
    assert not {n for n in names if "torch" in n}, names


def _bomb(path: Path, side: int) -> Path:
    """A valid grey PNG of side² pixels that compresses to almost nothing (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    z, row = zlib.compressobj(9), b"\0" * (side + 1)  # filter byte + a row of black
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def test_predict_reports_bad_files_and_classifies_the_rest(model_file, tmp_path):
    """A truncated PNG, a non-image and a 9 000² PNG bomb sit in one batch among good images."""
    batch = tmp_path / "batch"
    batch.mkdir()
    for i in range(6):
        Image.new("L", (12, 12), 255 if i % 2 else 0).save(batch / f"good{i}.png")
    good = (batch / "good0.png").read_bytes()
    (batch / "cut.png").write_bytes(good[: len(good) // 2])
    (batch / "text.jpg").write_text("not an image")
    _bomb(batch / "bomb.png", 9_000)  # 81 MP in a few KB; its header alone says no
    assert (batch / "bomb.png").stat().st_size < 200_000

    proc = _cli("predict", str(model_file), str(batch))  # default --max-pixels: 40 MP
    assert proc.returncode == 1
    got = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in proc.stdout.splitlines()}
    assert got == {f"good{i}.png": "bright" if i % 2 else "dark" for i in range(6)}
    errors = proc.stderr.splitlines()
    assert len(errors) == 4 and "Traceback" not in proc.stderr
    assert all(e.startswith("tlpipe-edge: error:") for e in errors)
    assert any("cut.png" in e and "not a readable image" in e for e in errors)
    assert any("text.jpg" in e and "not a readable image" in e for e in errors)
    assert any("bomb.png" in e and "9000×9000" in e and "not decoded" in e for e in errors)
    assert errors[-1].endswith("3 of 9 images could not be classified (see above)")


def test_pixel_limit_is_checked_before_decoding(model_file, tmp_path):
    """The limit holds for files only; PIL's own bomb guard does not get a say below it."""
    m = edge.EdgeModel(model_file, max_pixels=100)
    Image.new("L", (10, 10), 255).save(tmp_path / "ok.png")
    Image.new("L", (10, 11), 255).save(tmp_path / "big.png")
    assert m.predict([tmp_path / "ok.png"])[0][0] == "bright"
    with pytest.raises(TlpipeError, match="10×11 = 110 pixels is over the limit of 100"):
        m.predict([tmp_path / "big.png"])
