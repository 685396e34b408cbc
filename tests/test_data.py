"""Readers (IDX, ImageFolder, npz), prepared-split loading, and the fetch step."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import shutil
import socket
import sys
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import fmnist, make_patterns, mine, write_idx, write_idx_dataset

from tlpipe.data import download
from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import DATASETS, load_split
from tlpipe.data.readers import read_idx, read_raw
from tlpipe.errors import TlpipeError
from tlpipe.steps import fetch

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="no Debian Fashion-MNIST")


# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    x, _ = make_patterns(2)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", x, gz)), x)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 12)
    with pytest.raises(TlpipeError, match=r"bad.*magic number.*not an IDX"):
        read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_truncated(tmp_path: Path, gz: bool) -> None:
    x, _ = make_patterns(1)
    path = write_idx(tmp_path / "t", x, gz=False)
    data = path.read_bytes()[:-10]
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(TlpipeError, match=r"t: truncated: dims \(10, 28, 28\)"):
        read_idx(path)


def test_read_idx_damaged_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "g.gz", make_patterns(1)[0])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TlpipeError, match="g.gz: cannot read"):
        read_idx(path)


def test_read_raw_idx_gz_and_raw_agree(tmp_path: Path) -> None:
    a = read_raw(write_idx_dataset(tmp_path / "a", gz=True), "idx", "fashion-mnist")
    b = read_raw(write_idx_dataset(tmp_path / "b", gz=False), "idx", "fashion-mnist")
    assert a.x.shape == (120, 1, 28, 28) and a.test.sum() == 40 and not a.test[:80].any()
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and np.array_equal(a.keys, b.keys)
    assert a.y.dtype == np.int64 and a.classes == DATASETS["fashion-mnist"].classes
    assert len(set(a.keys.tolist())) == 120 and a.sizes.tolist()[0] == [28, 28]


def test_read_raw_idx_count_mismatch(idx_dir: Path) -> None:
    write_idx(idx_dir / "train-labels-idx1-ubyte.gz", np.zeros(79, np.uint8))
    with pytest.raises(TlpipeError, match="80 images but 79 labels"):
        read_raw(idx_dir, "idx")


def test_read_raw_idx_label_out_of_range(idx_dir: Path) -> None:
    write_idx(idx_dir / "t10k-labels-idx1-ubyte.gz", np.full(40, 10, np.uint8))
    with pytest.raises(TlpipeError, match="label 10 out of range.*10 classes"):
        read_raw(idx_dir, "idx", "fashion-mnist")


def test_read_raw_idx_wrong_dims_and_missing(idx_dir: Path) -> None:
    write_idx(idx_dir / "t10k-labels-idx1-ubyte.gz", np.zeros((40, 2), np.uint8))
    with pytest.raises(TlpipeError, match="labels must have 1 dim"):
        read_raw(idx_dir, "idx")
    (idx_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(TlpipeError, match=r"missing t10k-labels-idx1-ubyte\[.gz\]"):
        read_raw(idx_dir, "idx")
    with pytest.raises(TlpipeError, match="unknown data format"):
        read_raw(idx_dir, "csv")


# ---------------------------------------------------------------------------- ImageFolder


@pytest.mark.parametrize("channels", [1, 3])
def test_read_imagefolder(imagefolder_dir: Path, channels: int) -> None:
    (imagefolder_dir / "train" / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden: skipped
    raw = read_raw(imagefolder_dir, "imagefolder", channels=channels, size=16)
    assert raw.classes == ("cat", "dog", "fox")
    assert raw.x.shape == (18, channels, 16, 16) and raw.x.dtype == np.uint8
    assert raw.y[~raw.test].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and raw.test.sum() == 9
    assert raw.sizes[:3].tolist() == [[30, 20], [30, 27], [30, 34]]  # as stored
    if channels == 3:  # the class colour survives resizing: channel c is brightest for class c
        first_rgb = raw.x[0].reshape(3, -1).mean(axis=1)
        assert first_rgb.argmax() == 0


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [("notes.txt", b"hello", "not a readable image"), ("broken.png", None, "not a readable image")],
)
def test_read_imagefolder_bad_file(imagefolder_dir: Path, name: str, content, why: str) -> None:
    path = imagefolder_dir / "train" / "dog" / name
    if content is None:  # a real PNG cut in half
        content = (imagefolder_dir / "train" / "dog" / "img0.png").read_bytes()[:60]
    path.write_bytes(content)
    with pytest.raises(TlpipeError, match=f"{name}: {why}"):
        read_raw(imagefolder_dir, "imagefolder", size=16)


def test_read_imagefolder_needs_size_and_known_classes(imagefolder_dir: Path) -> None:
    with pytest.raises(TlpipeError, match="set prepare.input_size"):
        read_raw(imagefolder_dir, "imagefolder")
    (imagefolder_dir / "test" / "owl").mkdir()
    with pytest.raises(TlpipeError, match=r"class folder\(s\) \['owl'\] are not in the train"):
        read_raw(imagefolder_dir, "imagefolder", size=16)


# ---------------------------------------------------------------------------- npz


def _write_npz_dataset(root: Path, nhwc: bool = False, **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 6), ("test", 3)):
        x, y = make_patterns(n, n_classes=3)
        x = np.repeat(x[..., None], 3, axis=3) if nhwc else x
        np.savez(root / f"{name}.npz", x=x, y=y, classes=np.array(["a", "b", "c"]), **extra)
    return root


@pytest.mark.parametrize("nhwc", [False, True])
def test_read_npz(tmp_path: Path, nhwc: bool) -> None:
    raw = read_raw(_write_npz_dataset(tmp_path, nhwc), "npz")
    assert raw.classes == ("a", "b", "c")
    assert raw.x.shape == ((27, 3, 28, 28) if nhwc else (27, 1, 28, 28))
    assert raw.y[raw.test].tolist() == [0, 1, 2] * 3


def test_read_npz_errors(tmp_path: Path) -> None:
    root = _write_npz_dataset(tmp_path)
    np.savez(root / "test.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(TlpipeError, match="test.npz: 3 images but 2 labels"):
        read_raw(root, "npz")
    np.savez(root / "test.npz", x=np.zeros((1, 28, 28), np.uint8), y=np.array([3]))
    with pytest.raises(TlpipeError, match="label 3 out of range"):
        read_raw(root, "npz")
    np.savez(root / "test.npz", x=np.zeros((1, 28, 28), np.float32), y=np.array([0]))
    with pytest.raises(TlpipeError, match="x must be uint8"):
        read_raw(root, "npz")
    np.savez(root / "test.npz", images=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(TlpipeError, match=r"missing key\(s\) \['x', 'y'\]"):
        read_raw(root, "npz")
    (root / "test.npz").write_bytes(b"not a zip")
    with pytest.raises(TlpipeError, match="not a readable .npz"):
        read_raw(root, "npz")


# ---------------------------------------------------------------------------- helpers


def test_content_sha256_ignores_compression(tmp_path: Path) -> None:
    x = make_patterns(1)[0]
    a, b = write_idx(tmp_path / "a.gz", x, gz=True), write_idx(tmp_path / "b", x, gz=False)
    assert (
        download.content_sha256(a)
        == download.content_sha256(b)
        == hashlib.sha256(b.read_bytes()).hexdigest()
    )


def test_load_split_and_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(TlpipeError, match="run `tlpipe prepare` first"):
        load_split(tmp_path, "source")
    with pytest.raises(TlpipeError, match="unknown split 'train'"):
        load_split(tmp_path, "train")
    with pytest.raises(TlpipeError, match="manifest.json not found"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------------------- fetch


@pytest.fixture
def http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real HTTP server on 127.0.0.1 (free port) serving `tmp_path / "www"`."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_fetch_custom_url_with_sha256(http_server, tmp_path: Path) -> None:
    www, url = http_server
    (www / "data.npz").write_bytes(b"x" * 3_000_000)
    digest = hashlib.sha256(b"x" * 3_000_000).hexdigest()
    cfg = mine((f"{url}/data.npz",), sha256=digest)
    result = fetch.run(cfg, tmp_path / "raw")
    assert tmp_path / "raw" / "target" / "data.npz" in result.files and len(result.files) == 3
    assert result.sources == {"target": f"{url}/data.npz"}


def test_fetch_sha256_mismatch_leaves_nothing(http_server, tmp_path: Path) -> None:
    www, url = http_server
    (www / "data.npz").write_bytes(b"tampered")
    out = tmp_path / "out" / "raw"
    cfg = mine((f"{url}/data.npz",), sha256="ab" * 32)
    with pytest.raises(TlpipeError, match="checksum mismatch for http.*data.npz"):
        fetch.run(cfg, out)
    assert not out.exists() and _leftovers(out.parent) == []


def test_fetch_known_dataset_mismatch(http_server, tmp_path: Path) -> None:
    """Tiny files under the Fashion-MNIST names do not pass its known checksums."""
    www, url = http_server
    write_idx_dataset(www)
    out = tmp_path / "raw"
    with pytest.raises(TlpipeError, match="checksum mismatch for train-images.*content sha256"):
        fetch.run(fmnist((url,)), out)
    with pytest.raises(TlpipeError, match="checksum mismatch"):
        fetch.run(fmnist((str(www),)), out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_fetch_tries_sources_in_order(http_server, tmp_path: Path) -> None:
    www, url = http_server
    (www / "b.bin").write_bytes(b"b")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/a.bin"
    sources = (str(tmp_path / "missing"), f"{url}/nothing.bin", dead, f"{url}/b.bin")
    result = fetch.run(mine(sources, timeout=5), tmp_path / "r")
    assert result.sources["target"] == f"{url}/b.bin"
    assert (tmp_path / "r" / "target" / "b.bin").read_bytes() == b"b"
    with pytest.raises(TlpipeError, match=r"(?s)fetch fetch.target \(mine\).*missing: no.*404"):
        fetch.run(mine(sources[:2]), tmp_path / "r2")


def test_fetch_custom_local_dir_and_archives(http_server, tmp_path: Path) -> None:
    www, url = http_server
    tree = tmp_path / "tree" / "mydata"
    for split in ("train", "test"):
        (tree / split / "cat").mkdir(parents=True)
        (tree / split / "cat" / "a.png").write_bytes(split.encode())
    local = fetch.run(mine((str(tree),)), tmp_path / "r1")
    names = [p.relative_to(tmp_path / "r1").as_posix() for p in local.files]
    assert names == [
        "source.json",
        "target/test/cat/a.png",
        "target/train/cat/a.png",
        "target.json",
    ]
    names = [name.removeprefix("target/") for name in names[1:3]]
    with tarfile.open(www / "d.tar.gz", "w:gz") as t:
        t.add(tree, arcname="mydata")  # one top-level folder: lifted
    with zipfile.ZipFile(www / "d.zip", "w") as z:
        for name in names:
            z.write(tree / name, name)
    for name in ("d.tar.gz", "d.zip"):
        out = tmp_path / name
        fetch.run(mine((f"{url}/{name}",)), out)
        assert sorted(p.name for p in (out / "target").iterdir()) == ["test", "train"]
        assert (out / "target" / "train" / "cat" / "a.png").read_bytes() == b"train"


def test_fetch_config_errors(tmp_path: Path) -> None:
    with pytest.raises(TlpipeError, match="set fetch.target.sources"):
        fetch.run(mine(()), tmp_path / "r")
    with pytest.raises(TlpipeError, match="fashion-mnist has known checksums"):
        fetch.run(fmnist(sha256="ab" * 32), tmp_path / "r")


def test_fetch_failure_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(TlpipeError):
        fetch.run(mine((str(tmp_path / "nope"),)), out)
    assert (out / "keep.txt").read_text() == "old"


@needs_fmnist
def test_fetch_fashion_mnist_download_fallback(http_server, tmp_path: Path) -> None:
    """The local dir is missing, so fetch downloads (here: from a local mirror) and verifies."""
    www, url = http_server
    for f in FMNIST_DIR.iterdir():
        shutil.copyfile(f, www / f.name)
    cfg = fmnist((str(tmp_path / "not-installed"), url + "/"))
    result = fetch.run(cfg, tmp_path / "raw")
    assert result.sources == {"source": url + "/"}
    fetched = sorted(p.name for p in result.files if p.parent.name == "source")
    assert fetched == sorted(DATASETS["fashion-mnist"].files)


# ---------------------------------------------------------------------------- labels, folders


@pytest.mark.parametrize(
    ("split", "label", "match"),
    [
        ("train", 200, "train labels go up to 200 but none is 10 \\(190 missing\\)"),
        ("t10k", 12, "test label 12 is not a train label \\(0..9\\)"),
    ],
)
def test_unnamed_labels_must_run_without_gaps(idx_dir: Path, split, label, match) -> None:
    """With no class names there is no list to check against: a stray label must not add classes."""
    path = idx_dir / f"{split}-labels-idx1-ubyte.gz"
    y = np.tile(np.arange(10), 8 if split == "train" else 4).astype(np.uint8)
    y[3] = label
    write_idx(path, y)
    with pytest.raises(TlpipeError, match=match):
        read_raw(idx_dir, "idx", "my-data")


def test_unnamed_npz_labels_must_run_without_gaps(tmp_path: Path) -> None:
    for name, n in (("train", 4), ("test", 2)):
        x, y = make_patterns(n, n_classes=3)
        np.savez(tmp_path / f"{name}.npz", x=x, y=np.where(y == 2, 7, y))  # 0, 1, 7
    with pytest.raises(TlpipeError, match="train labels go up to 7 but none is 2"):
        read_raw(tmp_path, "npz")


def test_an_empty_class_folder_is_refused(imagefolder_dir: Path, tmp_path: Path) -> None:
    """DVC stores no empty folders: `train/bat` would vanish on restore, renumbering cat, dog…"""
    (imagefolder_dir / "train" / "bat").mkdir()
    with pytest.raises(TlpipeError, match=r"train/bat is an empty class folder: DVC drops"):
        read_raw(imagefolder_dir, "imagefolder", size=16)
    (imagefolder_dir / "train" / "bat" / ".DS_Store").write_bytes(b"junk")  # no image either
    with pytest.raises(TlpipeError, match=r"train/bat is an empty class folder"):
        read_raw(imagefolder_dir, "imagefolder", size=16)
    (imagefolder_dir / "train" / "bat" / ".DS_Store").unlink()
    out = tmp_path / "raw"
    cfg = mine((str(imagefolder_dir),))
    with pytest.raises(TlpipeError, match="folder train/bat is empty; DVC does not store empty"):
        fetch.run(cfg, out)  # refused at fetch already, before it reaches data/raw
    assert not out.exists()
    (imagefolder_dir / "test" / "owl").mkdir()  # empty too, and not a train class: same rule
    (imagefolder_dir / "train" / "bat").rmdir()
    with pytest.raises(TlpipeError, match="folder test/owl is empty"):
        fetch.run(cfg, out)


def test_reading_images_reports_progress(imagefolder_dir: Path, capsys, monkeypatch) -> None:
    read_raw(imagefolder_dir, "imagefolder", size=16)  # stderr is not a terminal under pytest
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "read 18 images from" in out and "images/s)" in out
    assert err == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    read_raw(imagefolder_dir, "imagefolder", size=16)
    bar = sys.stderr.getvalue()
    assert "18/18" in bar and " images/s" in bar and "read 18 images" not in bar


def test_threaded_decoding_keeps_the_files_order_across_buffers(tmp_path):
    """prepare decodes on several threads, a 16 MB buffer at a time: at 512 px RGB that is 21
    images, so 50 files span three buffers; every image lands in its own row, as read one by
    one, and a bad file in the last buffer is still refused by name."""
    from PIL import Image

    from tlpipe.data.image_files import content_key, load_image, read_imagefolder

    rng = np.random.default_rng(0)
    for i in range(50):
        folder = tmp_path / "data" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (6, 5, 3), np.uint8)).save(folder / f"{i:02d}.png")
    raw = read_imagefolder(tmp_path / "data", channels=3, input_size=512)
    files = sorted((tmp_path / "data").glob("c*/*.png"))
    rows = {raw.keys[i]: i for i in range(len(raw.y))}
    assert len(rows) == 50
    for path in files:  # pixels, key and label of one row belong to one file
        row = rows[content_key(path.read_bytes())]
        np.testing.assert_array_equal(raw.x[row], load_image(path, 3, 512)[0])
        assert raw.classes[raw.y[row]] == path.parent.name
    (tmp_path / "data" / "c1" / "99.png").write_bytes(b"\x89PNG cut off")
    with pytest.raises(TlpipeError, match=r"99.png: not a readable image"):
        read_imagefolder(tmp_path / "data", channels=3, input_size=512)
