"""The hostile-input corpus: bad inputs made here (small on disk: bombs are written compressed,
big files sparse), fed to the real CLI in a subprocess. Each must be refused with a non-zero exit
and exactly one line on stderr, leave nothing that looks like a finished output (what DVC
would accept), and stay under 500 MB of peak RSS (the child's own, from wait4).

Larger versions of the bombs (GBs inside) run under `-m slow`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    fetched,
    make_patterns,
    png_header_only,
    write_idx,
    write_idx_dataset,
    write_imagefolder,
)

MAX_RSS_MB = 500


@dataclasses.dataclass
class Ran:
    rc: int
    stdout: str
    stderr: str
    peak_mb: float


# The command runs under a small Python that waits for it and writes its peak RSS to a file:
# Linux counts what a child had before exec (a fork of this test process, torch and all) in
# its ru_maxrss, so the fork must come from a process that is small itself.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_cli(args: list[str], cwd: Path, module: str = "tlpipe.cli", timeout: float = 180) -> Ran:
    """Run `python -m module args` in `cwd`; its exit status, output and peak RSS (wait4)."""
    return measured([sys.executable, "-m", module, *args], cwd, timeout)


def measured(cmd: list[str], cwd: Path, timeout: float = 180) -> Ran:
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(peak), *cmd],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        kb = int(peak.read_text()) if peak.exists() else 0
    return Ran(proc.returncode, proc.stdout, proc.stderr, kb / 1024)


def assert_refused(ran: Ran, match: str, *absent: Path, max_mb: float = MAX_RSS_MB) -> None:
    """Non-zero exit, one line on stderr that says `match`, bounded memory, no output left."""
    lines = ran.stderr.strip().splitlines()
    print(f"peak RSS {ran.peak_mb:.0f} MB, exit {ran.rc}: {ran.stderr.strip()}")  # -rP shows it
    assert ran.rc != 0, ran
    assert len(lines) == 1, ran.stderr
    assert match in lines[0], lines[0]
    assert ran.peak_mb < max_mb, f"peak RSS {ran.peak_mb:.0f} MB"
    for path in absent:  # neither the output nor a temp sibling of it
        assert not path.exists(), path
        assert not list(path.parent.glob(f".{path.name}.*")), list(path.parent.iterdir())


def project(root: Path, target: dict | None = None, **sections: dict) -> Path:
    """A project folder with a params.yaml: `target` is fetch.target; no source dataset."""
    root.mkdir(parents=True, exist_ok=True)
    params = {
        "fetch": {"source": None, "target": target or {"dataset": "mine", "format": "imagefolder"}},
        "prepare": {"input_size": 16, "target": {"classes": []}},
        "pretrain": {"pretrained": "imagenet"},
        "strategies": ["linear_probe"],
    }
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def fetch_cli(root: Path, source: Path | str, fmt: str, *sets: str) -> Ran:
    project(root, {"dataset": "mine", "format": fmt, "sources": [str(source)]})
    return run_cli(
        ["fetch", "--out", "data/raw", "--no-track", *[f"--set={s}" for s in sets]], root
    )


def prepare_cli(root: Path, *sets: str) -> Ran:
    if not (root / "params.yaml").exists():
        project(root)
    args = ["prepare", "--raw", "data/raw", "--out", "data/prepared", "--no-track"]
    return run_cli(args + [f"--set={s}" for s in sets], root)


def zeros_zip(path: Path, name: str, n_bytes: int) -> Path:
    """A zip whose one member inflates to `n_bytes` of zeros, written streamed."""
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z,
        z.open(name, "w", force_zip64=True) as f,
    ):
        block = bytes(1 << 20)
        for _ in range(n_bytes >> 20):
            f.write(block)
    return path


# ---------------------------------------------------------------------------- archives (fetch)


def test_a_zip_bomb_stops_at_the_ratio_cap(tmp_path: Path) -> None:
    bomb = zeros_zip(tmp_path / "bomb.zip", "cat/a.png", 300 << 20)  # 300 MB in ~300 KB
    ran = fetch_cli(tmp_path / "p", bomb, "imagefolder")
    assert_refused(
        ran,
        "bomb.zip: refused, it unpacks to more than fetch.max_unpack_ratio = 200",
        tmp_path / "p" / "data" / "raw",
    )


def test_a_big_archive_stops_at_the_size_cap(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    archive = tmp_path / "big.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        for i in range(3):
            data = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()  # incompressible
            info = tarfile.TarInfo(f"cat/{i}.png")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    ran = fetch_cli(tmp_path / "p", archive, "imagefolder", "fetch.max_unpack_bytes=2000000")
    assert_refused(ran, "fetch.max_unpack_bytes = 2,000,000 bytes", tmp_path / "p/data/raw")


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize(
    ("member", "match"),
    [
        ("../evil.png", "climbs out with '..'"),
        ("/tmp/evil.png", "has an absolute path"),
        ("cat/../../evil.png", "climbs out with '..'"),
    ],
)
def test_zip_and_tar_members_follow_one_rule(tmp_path: Path, kind: str, member: str, match) -> None:
    archive = tmp_path / f"evil.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("cat/a.png", b"fine")
            z.writestr(zipfile.ZipInfo(member), b"evil")  # ZipInfo keeps the name as given
    else:
        with tarfile.open(archive, "w") as t:
            for name, data in (("cat/a.png", b"fine"), (member, b"evil")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    ran = fetch_cli(tmp_path / "p", archive, "imagefolder")
    assert_refused(
        ran, f"evil.{kind}: cannot unpack: member {member!r} {match}", tmp_path / "p/data/raw"
    )
    assert not list(tmp_path.rglob("evil.png"))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_archive_link_out_is_refused_in_zip_and_tar(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / f"link.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            info = zipfile.ZipInfo("cat/creds.png")
            info.external_attr = (0o120777 << 16) | 0x20  # a symlink, as `zip -y` stores it
            z.writestr(info, "/etc/passwd")
    else:
        with tarfile.open(archive, "w") as t:
            info = tarfile.TarInfo("cat/creds.png")
            info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
            t.addfile(info)
    ran = fetch_cli(tmp_path / "p", archive, "imagefolder")
    assert_refused(ran, "'cat/creds.png' is a link out of the archive", tmp_path / "p/data/raw")


def test_a_source_folder_holding_the_project_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "p"
    write_imagefolder(root / "images")
    ran = fetch_cli(root, root, "imagefolder")  # the project itself: data/raw would be inside
    assert_refused(ran, "holds fetch's output (in ", root / "data" / "raw")


def test_a_symlink_out_of_a_source_folder_is_refused(tmp_path: Path) -> None:
    folder = write_imagefolder(tmp_path / "images")
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    (folder / "train" / "cat" / "x.png").symlink_to(secret)
    ran = fetch_cli(tmp_path / "p", folder, "imagefolder")
    assert_refused(ran, "x.png is a symlink that leads out of", tmp_path / "p/data/raw")


# ---------------------------------------------------------------------------- raw data (prepare)


def idx_bomb(path: Path, dims: tuple[int, ...], n_bytes: int) -> Path:
    """A gzipped IDX file: a header declaring `dims`, then `n_bytes` of zeros (streamed)."""
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims))
        block = bytes(1 << 20)
        for _ in range(n_bytes >> 20):
            f.write(block)
    return path


def idx_raw(root: Path) -> Path:
    raw = fetched(root / "data" / "raw", write_idx_dataset(root / "idx"), "idx", source=None)
    project(root, {"dataset": "mine", "format": "idx"}, prepare={"input_size": None})
    return raw


@pytest.mark.parametrize(
    ("dims", "match"),
    [
        (
            (20_000, 100, 100),
            "its header declares dims (20000, 100, 100) = 200,000,000 bytes, more than "
            "prepare.max_unpack_ratio = 200 x its",
        ),  # it says so
        ((10, 28, 28), "too long: dims (10, 28, 28) need 7840 bytes of data, found more"),
    ],  # lies
)
def test_a_gzip_bombed_idx_is_refused_from_its_header(tmp_path: Path, dims, match) -> None:
    raw = idx_raw(tmp_path)
    images = raw / "target" / "train-images-idx3-ubyte.gz"
    idx_bomb(images, dims, 200 << 20)  # 200 MB inside, ~200 KB on disk
    assert images.stat().st_size < 2 << 20
    ran = prepare_cli(tmp_path)
    assert_refused(ran, f"train-images-idx3-ubyte.gz: {match}", tmp_path / "data" / "prepared")


def test_an_npz_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    src = tmp_path / "npz"
    src.mkdir()
    np.savez_compressed(
        src / "train.npz", x=np.zeros((2000, 1, 300, 300), np.uint8), y=np.zeros(2000, np.int64)
    )
    fetched(tmp_path / "data" / "raw", src, "npz", source=None)
    project(tmp_path, {"dataset": "mine", "format": "npz"}, prepare={"input_size": None})
    ran = prepare_cli(tmp_path)
    assert_refused(ran, "member x.npy declares (2000, 1, 300, 300)", tmp_path / "data/prepared")


def image_raw(root: Path, **kw) -> Path:
    folder = write_imagefolder(root / "images", **kw)
    fetched(root / "data" / "raw", folder, "imagefolder", source=None)
    project(root)
    return root / "data" / "raw" / "target"


def test_a_huge_image_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    raw = image_raw(tmp_path)
    huge = raw / "train" / "cat" / "huge.png"
    with open(huge, "wb") as f:  # sparse: 300 MB to read, nothing on disk
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(300 << 20)
    ran = prepare_cli(tmp_path)
    assert_refused(
        ran,
        "huge.png: 314,572,800 bytes is over prepare.max_image_bytes = 200,000,000",
        tmp_path / "data/prepared",
    )


def test_a_pixel_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    raw = image_raw(tmp_path)
    (raw / "train" / "cat" / "bomb.png").write_bytes(png_header_only(13_300, 13_300))
    ran = prepare_cli(tmp_path)
    assert_refused(ran, "over prepare.max_image_pixels", tmp_path / "data/prepared")


def test_an_unreadable_image_is_named_without_python_objects(tmp_path: Path) -> None:
    raw = image_raw(tmp_path)
    (raw / "train" / "cat" / "junk.png").write_bytes(b"not an image at all")
    ran = prepare_cli(tmp_path)
    assert_refused(
        ran,
        "junk.png: not a readable image (cannot identify image file)",
        tmp_path / "data/prepared",
    )
    assert "<_io" not in ran.stderr and "0x" not in ran.stderr


def test_a_one_class_dataset_is_refused(tmp_path: Path) -> None:
    image_raw(tmp_path, classes=("cat",), per_class=6)
    ran = prepare_cli(tmp_path)
    assert_refused(
        ran,
        "the target has 1 class (cat): a classifier needs at least 2",
        tmp_path / "data/prepared",
    )


def manifest_raw(root: Path, rows: list[str]) -> None:
    folder = root / "images"
    write_imagefolder(folder, per_class=6)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("t*/*/*"))
    lines = [f"{f},{f.split('/')[1]},{f.split('/')[0]}" for f in files]
    (folder / "manifest.csv").write_text("\n".join(["path,label,split", *lines, *rows]) + "\n")
    fetched(root / "data" / "raw", folder, "manifest", source=None)
    project(root, {"dataset": "mine", "format": "manifest"})


def test_a_label_typo_that_makes_a_class_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images" / "extra").mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(tmp_path / "images" / "extra" / "x.png")
    manifest_raw(tmp_path, ["extra/x.png,dgo,train"])
    ran = prepare_cli(tmp_path)
    assert_refused(
        ran, "target class 'dgo' has no validation and no test image", tmp_path / "data/prepared"
    )


def test_a_duplicate_manifest_row_is_refused(tmp_path: Path) -> None:
    manifest_raw(tmp_path, ["train/cat/img0.png,dog,train"])  # the same image, another label
    ran = prepare_cli(tmp_path)
    assert_refused(
        ran, "lists 'train/cat/img0.png' again (first in row", tmp_path / "data/prepared"
    )


# ---------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        (
            "finetune.backbone_lr_scale=-1",
            "finetune.backbone_lr_scale = -1.0 is out of range: it must be >= 0",
        ),
        ("finetune.l2sp=-1", "finetune.l2sp = -1.0 is out of range"),
        (
            "finetune.train.momentum=5",
            "finetune.train.momentum = 5.0 is out of range: it must be in [0, 1)",
        ),
        (
            "finetune.train.steps_per_epoch=-1",
            "finetune.train.steps_per_epoch = -1 is out of range",
        ),
        ("finetune.train.weight_decay=-1", "finetune.train.weight_decay = -1.0 is out of range"),
        (
            "register.significance=2",
            "register.significance = 2.0 is out of range: it must be in (0, 1)",
        ),
        ("register.significance=0", "register.significance = 0.0 is out of range"),
        (
            "fetch.max_unpack_ratio=0.5",
            "fetch.max_unpack_ratio = 0.5 is out of range: it must be >= 1",
        ),
    ],
)
def test_a_param_out_of_range_is_refused_in_one_line(tmp_path: Path, setting, match) -> None:
    ran = run_cli(["params", "-p", "none.yaml", f"--set={setting}"], tmp_path)
    assert_refused(ran, match)


# ---------------------------------------------------------------------------- edge


def tiny_onnx(path: Path, meta: dict[str, object], c: int = 1, side: int = 8, k: int = 3) -> Path:
    """A linear classifier (input (N, c, side, side) → logits (N, k)) with tlpipe metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((k, c * side * side), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(k, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    base = {
        "classes": ["a", "b", "c"],
        "input_shape": [c, side, side],
        "mean": [0.5],
        "std": [0.25],
    }
    props = {key: json.dumps(value) for key, value in {**base, **meta}.items()}
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


BAD_METADATA = [
    ({"classes": ["a", "b"]}, "2 classes, but the graph has [3] outputs"),
    ({"classes": ["a", "b", "c", "d"]}, "4 classes, but the graph has [3] outputs"),
    ({"input_shape": [1, 16, 16]}, "input_shape [1, 16, 16], but the graph takes [1, 8, 8]"),
    ({"mean": [0.5, 0.5, 0.5]}, "mean [0.5, 0.5, 0.5] (want 1 finite number(s), one a channel)"),
    ({"std": [0.0]}, "std [0.0] (want > 0: it divides)"),
    ({"classes": [f"c{i}" for i in range(200_000)]}, "200000 classes (want 2 to 100,000)"),
]


@pytest.mark.parametrize(("meta", "match"), BAD_METADATA)
def test_edge_refuses_metadata_that_does_not_fit_the_graph(tmp_path: Path, meta, match) -> None:
    from PIL import Image

    model = tiny_onnx(tmp_path / "model.onnx", meta)
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    ran = run_cli(["predict", str(model), str(tmp_path / "x.png")], tmp_path, "tlpipe.edge")
    assert_refused(ran, f"tlpipe metadata does not fit the model: {match}")


def test_edge_predict_says_one_line_for_an_image_over_pillows_warning(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "model.onnx", {})
    (tmp_path / "big.png").write_bytes(png_header_only(9_500, 9_500))  # 90 MP: PIL warns
    ran = run_cli(["predict", str(model), str(tmp_path / "big.png")], tmp_path, "tlpipe.edge")
    assert_refused(ran, "90250000 pixels is over the limit of 40000000")


@contextlib.contextmanager
def registry(model: Path, trickle: float = 0.0) -> Iterator[str]:
    """A stand-in MLflow REST API serving `model` as m@champion (or trickling it)."""
    data, sha = model.read_bytes(), hashlib.sha256(model.read_bytes()).hexdigest()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 — the stdlib's name
            if "/alias" in self.path:
                tags = [{"key": "onnx_sha256", "value": sha}]
                body = {"model_version": {"name": "m", "version": "1", "run_id": "r", "tags": tags}}
            elif "/runs/get" in self.path:
                body = {"run": {"info": {"artifact_uri": "mlflow-artifacts:/0/r/artifacts"}}}
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    for i in range(len(data)):
                        if trickle:
                            time.sleep(trickle)
                        self.wfile.write(data[i : i + 1] if trickle else data)
                        if not trickle:
                            break
                return
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(("meta", "match"), BAD_METADATA[:3])
def test_pull_refuses_a_bad_model_before_installing_it(tmp_path: Path, meta, match) -> None:
    model = tiny_onnx(tmp_path / "model.onnx", meta)
    with registry(model) as uri:
        ran = run_cli(
            ["pull", "--model-dir", str(tmp_path / "models"), "--name", "m", "--tracking-uri", uri],
            tmp_path,
            "tlpipe.edge",
        )
    assert_refused(ran, match)
    assert (
        not list((tmp_path / "models").glob("m-*")) and not (tmp_path / "models/current").exists()
    )


def test_pull_stops_at_its_deadline_however_slowly_the_server_sends(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "model.onnx", {})
    with registry(model, trickle=0.2) as uri:
        start = time.monotonic()
        ran = run_cli(
            [
                "pull",
                "--model-dir",
                str(tmp_path / "models"),
                "--name",
                "m",
                "--tracking-uri",
                uri,
                "--timeout",
                "1",
                "--deadline",
                "2",
            ],
            tmp_path,
            "tlpipe.edge",
        )
        took = time.monotonic() - start
    assert_refused(ran, "took over --deadline = 2 s")
    assert took < 60  # a bound far above the deadline, only to catch a pull that never ends
    assert not (tmp_path / "models" / "current").exists()


# ---------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path: Path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("ran code",))

    (tmp_path / "model.pt").write_bytes(pickle.dumps({"meta": Boom()}))
    prepared = tmp_path / "prepared"  # export loads the checkpoint first
    ran = run_cli(
        [
            "export",
            "--model",
            "model.pt",
            "--prepared",
            str(prepared),
            "--out",
            "onnx",
            "--no-track",
        ],
        tmp_path,
    )
    # `import torch` alone (a CUDA build) peaks near 700 MB: the bound is that plus 100 MB
    baseline = _torch_import_mb(tmp_path)
    assert_refused(
        ran,
        "model.pt is not a readable tlpipe model",
        tmp_path / "onnx",
        max_mb=max(MAX_RSS_MB, baseline + 100),
    )
    assert "weights_only" not in ran.stderr and "ran code" not in ran.stdout


# ---------------------------------------------------------------------------- helpers


def _torch_import_mb(cwd: Path) -> float:
    """Peak RSS of a Python that only imports torch: the floor of every torch step."""
    return measured([sys.executable, "-c", "import torch"], cwd).peak_mb


# ---------------------------------------------------------------------------- the big ones


@pytest.mark.slow
def test_a_10_gb_gzip_bombed_idx_stays_small(tmp_path: Path) -> None:
    raw = idx_raw(tmp_path)
    images = raw / "target" / "train-images-idx3-ubyte.gz"
    idx_bomb(images, (100_000, 100, 1000), 10_000 << 20)  # the header says 10 GB too
    ran = prepare_cli(tmp_path)
    assert_refused(ran, "more than prepare.max_unpack_ratio", tmp_path / "data/prepared")


@pytest.mark.slow
def test_a_3_gb_zip_bomb_writes_no_more_than_the_cap(tmp_path: Path) -> None:
    bomb = zeros_zip(tmp_path / "bomb.zip", "cat/a.png", 3 << 30)
    ran = fetch_cli(tmp_path / "p", bomb, "imagefolder")
    assert_refused(ran, "fetch.max_unpack_ratio", tmp_path / "p/data/raw")


@pytest.mark.slow
def test_a_1_gb_image_file_is_not_read(tmp_path: Path) -> None:
    raw = image_raw(tmp_path)
    with open(raw / "train" / "cat" / "huge.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(1 << 30)
    ran = prepare_cli(tmp_path, "prepare.max_image_bytes=2000000000")  # read, then refused
    assert_refused(ran, "huge.png: not a readable image", tmp_path / "data/prepared")


def test_write_idx_is_what_the_corpus_bombs_look_like(tmp_path: Path) -> None:
    """The bomb writer and conftest's writer agree on the header (so the bombs are real IDX)."""
    x, _ = make_patterns(1)
    a = gzip.decompress(write_idx(tmp_path / "a.gz", x).read_bytes())[:16]
    b = gzip.decompress(idx_bomb(tmp_path / "b.gz", x.shape, 0).read_bytes())
    assert a == b
