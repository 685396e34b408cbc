"""Splits on disk and the streaming loader: same batches as in memory, no whole-split copies."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from tlpipe import fsio
from tlpipe.data.loader import ArrayBatches, Feed, Transform, streaming_reader
from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import (
    ArrayWriter,
    Split,
    file_view,
    load_split,
    read_rows,
    save_split,
    split_sha256,
    take_rows,
)
from tlpipe.errors import TlpipeError
from tlpipe.params.learning import Augment, ColorJitter, RandomResizedCrop
from tlpipe.train import joint
from tlpipe.train.loop import TrainConfig, fit, predict
from tlpipe.train.models import build_model

CPU = torch.device("cpu")
AUGMENT = Augment()  # the default recipe: pad_crop 2, hflip
# every augmentation at once (v2 per image, then the batch ops)
FULL = Augment(RandomResizedCrop(scale=(0.3, 1.0)), ColorJitter(0.4, 0.4), pad_crop=3)


def _split(n: int, seed: int = 0, size: int = 16) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)
    return Split(x=x, y=np.arange(n) % 5, shifted=np.arange(n) % 3 == 0)


def _on_disk(tmp_path: Path, n: int, size: int = 16) -> Split:
    save_split(tmp_path, "source", _split(n, size=size))
    return load_split(tmp_path, "source")


# ---------------------------------------------------------------------------- storage


def test_split_round_trips_memory_mapped_with_the_same_hash(tmp_path: Path) -> None:
    split = _split(50)
    paths = save_split(tmp_path, "target_test", split)
    assert sorted(p.name for p in paths.values()) == [
        "target_test.shifted.npy",
        "target_test.x.npy",
        "target_test.y.npy",
    ]
    back = load_split(tmp_path, "target_test")
    assert isinstance(back.x, np.memmap) and file_view(back.x) is not None
    np.testing.assert_array_equal(back.x, split.x)
    np.testing.assert_array_equal(back.y, split.y)
    np.testing.assert_array_equal(back.shifted, split.shifted)
    assert split_sha256(back) == split_sha256(split)
    old = "".join(fsio.sha256_array(a) for a in (split.x, split.y, split.shifted))  # the old rule
    assert split_sha256(split) == hashlib.sha256(old.encode()).hexdigest()


def test_rows_read_through_the_file_equal_indexing(tmp_path: Path) -> None:
    x = _on_disk(tmp_path, 40).x
    idx = np.array([39, 0, 7, 7, -1])
    np.testing.assert_array_equal(take_rows(x, idx), np.asarray(x)[idx])
    np.testing.assert_array_equal(read_rows(x, 5, 12), np.asarray(x)[5:12])
    view = x[10:30]  # a row slice keeps reading through the file, at its own offset
    assert file_view(view) is not None
    np.testing.assert_array_equal(take_rows(view, np.array([0, 19])), np.asarray(x)[[10, 29]])
    np.testing.assert_array_equal(read_rows(view, 18, 99), np.asarray(x)[28:30])
    with pytest.raises(IndexError):
        take_rows(x, np.array([40]))


def test_a_missing_or_short_split_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TlpipeError, match="run `tlpipe prepare` first"):
        load_split(tmp_path, "source")
    writer = ArrayWriter(tmp_path / "a.npy", (3, 1, 2, 2), np.uint8)
    with pytest.raises(TlpipeError, match="wrote 2 rows of 3"), writer as w:
        w.write(np.zeros((2, 1, 2, 2), np.uint8))


def test_prepared_splits_are_memory_mapped(tiny_prepared: Path) -> None:
    assert isinstance(load_split(tiny_prepared, "source").x, np.memmap)


# ---------------------------------------------------------------------------- same batches


def _feed(batches, streaming: bool, workers: int = 0, augment: Augment = AUGMENT, **kw) -> Feed:
    t = Transform(augment, seed=3, mean=(0.5,), std=(0.25,))
    limit = 0 if streaming else 1e9
    return Feed(batches, t, CPU, max_in_memory_mb=limit, num_workers=workers, **kw)


# the streaming readers: worker processes (a CPU's), threads (CUDA's; no pinning on a CPU)
READERS = ["processes", "threads"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("augment", [AUGMENT, FULL, Augment.off()], ids=["default", "v2", "off"])
def test_streamed_batches_equal_in_memory_batches(
    tmp_path: Path, augment: Augment, reader: str
) -> None:
    x = _on_disk(tmp_path, 70).x
    y = np.arange(70) % 5
    memory = _feed(ArrayBatches(x, y, 16, seed=1, steps_per_epoch=6), False, augment=augment)
    stream = _feed(
        ArrayBatches(x, y, 16, seed=1, steps_per_epoch=6), True, 2, augment, reader=reader
    )
    assert stream.streaming and not memory.streaming
    for epoch in (0, 1):
        got = list(stream.epoch(epoch))
        want = list(memory.epoch(epoch))
        assert len(got) == len(want) == 6
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g["input"], w["input"]) and torch.equal(g["y"], w["y"])


@pytest.mark.parametrize("workers", [0, 3])
def test_threaded_reader_shards_like_the_other_routes(tmp_path: Path, workers: int) -> None:
    """A rank's shard of each global batch (distributed.shard), in step order, from 0 or 3
    reader threads, equals the in-memory route's and the worker processes' shard."""
    from tlpipe.train.distributed import World, shard

    x, y = _on_disk(tmp_path, 70).x, np.arange(70) % 5
    mine = functools.partial(shard, w=World(rank=1, size=2))
    feeds = [
        _feed(ArrayBatches(x, y, 16, seed=1, steps_per_epoch=5), streaming, n, shard=mine, **kw)
        for streaming, n, kw in [
            (False, 0, {}),
            (True, 2, {"reader": "processes"}),
            (True, workers, {"reader": "threads"}),
        ]
    ]
    want, *others = ([b for e in (0, 1) for b in f.epoch(e)] for f in feeds)
    assert len(want) == 10 and all(len(b["y"]) == 8 for b in want)
    for got in others:
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g["input"], w["input"]) and torch.equal(g["y"], w["y"])


def test_threaded_reader_raises_a_readers_error_and_leaves_no_thread(tmp_path: Path) -> None:
    x, y = _on_disk(tmp_path, 64).x, np.arange(64) % 5
    feed = _feed(ArrayBatches(x, y, 8, seed=0), True, 3, reader="threads")
    batches = feed.epoch(0)
    next(batches)
    batches.close()  # stopped early (an error in training): the readers finish and go
    assert not _readers_alive()
    # the split's file loses its last row under the reader: a reader thread (not step 0,
    # which is read in the caller's thread) meets it, and its error reaches the training loop
    path = tmp_path / "source.x.npy"
    os.truncate(path, path.stat().st_size - x[:1].nbytes)
    assert 63 not in feed.train.order(2)[:8].tolist()
    with pytest.raises(TlpipeError, match="short read"):
        list(feed.epoch(2))
    assert not _readers_alive()


def _readers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tlpipe-reader")]


def test_an_error_in_training_stops_the_reader_threads_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fit closes the epoch's batches on its way out: while the error (and so the training
    loop's frame, which holds them) is still referenced, no reader thread is left. On a
    terminal, where the progress bar does not pass a close on to them, too."""
    from tlpipe.train import loop

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(loop, "Feed", functools.partial(Feed, reader="threads"))
    x, y = _on_disk(tmp_path, 64).x, np.arange(64) % 5
    cfg = TrainConfig(epochs=1, batch_size=8, max_in_memory_mb=0, num_workers=3, device="cpu")
    steps = []

    def loss_fn(model, batch):
        steps.append(len(batch["y"]))
        if len(steps) == 2:
            raise RuntimeError("the step failed")
        return torch.nn.functional.cross_entropy(model(batch["input"]), batch["y"])

    model = build_model("small_cnn", 5)
    with pytest.raises(RuntimeError, match="the step failed") as failed:
        fit(model, ArrayBatches(x, y, 8), cfg, mean=[0.5], std=[0.25], loss_fn=loss_fn)
    assert failed.traceback and steps == [8, 8]
    assert not _readers_alive()


def test_the_streaming_reader_is_threads_on_cuda_and_processes_elsewhere() -> None:
    assert streaming_reader(torch.device("cuda")) == "threads"
    assert streaming_reader(CPU) == "processes"
    assert streaming_reader(CPU, "threads") == "threads"
    with pytest.raises(ValueError, match="reader must be one of auto, threads, processes"):
        streaming_reader(CPU, "thread")


def test_streamed_joint_batches_equal_in_memory_ones(tmp_path: Path) -> None:
    src = _on_disk(tmp_path, 60)
    w = np.linspace(0.1, 2, 60).astype(np.float32)
    stream = joint.SourceStream(src.x, src.y, w, np.arange(0, 60, 2), num_classes=5)

    def batches() -> joint.JointBatches:
        target = ArrayBatches(np.asarray(src.x[:10]), np.arange(10) % 5, 4, steps_per_epoch=3)
        return joint.JointBatches(target, stream, joint.JointConfig(source_batch_size=6), seed=2)

    want = list(_feed(batches(), streaming=False).epoch(1))
    for reader in READERS:
        got = list(_feed(batches(), streaming=True, workers=1, reader=reader).epoch(1))
        for g, w_ in zip(got, want, strict=True):
            for key in ("input", "y", "w", "domain"):
                assert torch.equal(g[key], w_[key]), key


def test_a_row_subset_gives_the_batches_of_its_copy(tmp_path: Path) -> None:
    """The specialist's matched source: trained on in place, as if copied out."""
    x = _on_disk(tmp_path, 80).x
    y, rows = np.arange(80) % 5, np.arange(3, 80, 3)
    want = list(_feed(ArrayBatches(np.asarray(x)[rows], y[rows], 8, seed=4), False).epoch(1))
    for streaming in (False, True):
        subset = ArrayBatches(x, y, 8, seed=4, rows=rows)
        assert subset.nbytes == x[rows].nbytes
        got = list(_feed(subset, streaming).epoch(1))
        assert len(got) == len(want) == 4
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g["input"], w["input"]) and torch.equal(g["y"], w["y"])


def test_fit_streamed_equals_fit_in_memory(tiny_prepared: Path) -> None:
    m = load_manifest(tiny_prepared)
    src, val = load_split(tiny_prepared, "source"), load_split(tiny_prepared, "source_val")
    states = []
    for limit in (1e9, 0):  # in memory, then streamed by 2 workers
        torch.manual_seed(0)
        model = build_model("small_cnn", 5)
        cfg = TrainConfig(
            epochs=2,
            batch_size=32,
            steps_per_epoch=4,
            augment=True,
            seed=5,
            max_in_memory_mb=limit,
            num_workers=2,
        )
        res = fit(
            model,
            ArrayBatches(src.x, src.y, 32, seed=5, steps_per_epoch=4),
            cfg,
            mean=m.mean,
            std=m.std,
            val=(val.x, val.y),
        )
        states.append((model.state_dict(), res.history))
    (a, hist_a), (b, hist_b) = states
    assert hist_a == hist_b
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------- memory


def _traced_peak(fn) -> int:
    """Peak bytes numpy allocated while `fn` ran (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_fit_and_predict_copy_no_whole_split(tmp_path: Path) -> None:
    split = _on_disk(tmp_path, 6000, size=28)  # 4.7 MB of images
    whole = split.x.nbytes
    torch.manual_seed(0)
    model = build_model("small_cnn", 5)
    cfg = TrainConfig(
        epochs=1, batch_size=64, steps_per_epoch=20, augment=True, max_in_memory_mb=0, num_workers=0
    )

    def train() -> None:
        fit(
            model,
            ArrayBatches(split.x, split.y, 64, steps_per_epoch=20),
            cfg,
            mean=[0.5],
            std=[0.25],
            val=(split.x, split.y),
        )

    def infer() -> None:
        predict(model, split.x, [0.5], [0.25], batch_size=256)

    assert _traced_peak(train) < whole / 10  # batches of 64 rows, not the split
    logits = 6000 * 5 * 4  # the result itself
    assert _traced_peak(infer) < logits + whole / 10


def test_a_streamed_row_subset_and_match_embeddings_copy_no_whole_split(tmp_path: Path) -> None:
    from tlpipe.steps.match import embed_images

    split = _on_disk(tmp_path, 6000, size=28)
    whole = split.x.nbytes
    subset = ArrayBatches(split.x, split.y, 64, rows=np.arange(0, 6000, 2), steps_per_epoch=20)
    feed = _feed(subset, streaming=True)
    assert _traced_peak(lambda: list(feed.epoch(0))) < whole / 10
    model = build_model("small_cnn", 5)
    features = 6000 * 2 * (16 + 32 + 64 + 64) * 4  # the embeddings themselves
    peak = _traced_peak(lambda: embed_images(model, split.x, [0.5], [0.25], batch_size=256))
    assert peak < features + whole / 10


def test_the_threshold_picks_the_route(tmp_path: Path) -> None:
    x = _on_disk(tmp_path, 100).x  # 25.6 kB
    off = Transform(Augment.off(), 0, (0.0,), (1.0,))
    small = Feed(ArrayBatches(x, np.zeros(100), 10), off, CPU, 1)
    big = Feed(ArrayBatches(x, np.zeros(100), 10), off, CPU, 0.01)
    assert not small.streaming and isinstance(small.train.x, torch.Tensor)
    assert big.streaming and isinstance(big.train.x, np.memmap)


# ---------------------------------------------------------------------------- benchmarks


def _bench(script: str, *args: str) -> str:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / script), "--quick", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow  # ~12 s; the loader itself is tested above
def test_gpu_loader_benchmark_runs_on_a_cpu_at_a_tiny_size() -> None:
    out = _bench("gpu_loader.py", "--device", "cpu")
    assert "reader processes" in out.splitlines()[0]  # a CPU's (threads on CUDA)
    assert "(median of " in out  # ceiling and tlpipe measured alternately (once: --quick)
    assert "loader throughput tlpipe/on-device = " in out.splitlines()[-1]


@pytest.mark.slow
def test_data_scale_benchmark_quick(tmp_path: Path) -> None:
    out = _bench("data_scale.py", "--work", str(tmp_path))
    assert out.splitlines()[-1].startswith("peak RSS ratio 100k/2k = ")
    assert "loader throughput tlpipe/torchvision = " in out.splitlines()[-1]
