"""Training batches: what a batch holds, how it is augmented, and how it reaches the device.

A batches object (`ArrayBatches`, `tlpipe.train.joint.JointBatches`) defines batch `step` of
`epoch` as a pure function of (seed, epoch, step) over its images, which are either in memory
or a memory-mapped prepared split (`tlpipe.data.prepared.load_split`). `Feed` then takes one of two
routes, chosen by size (`TrainConfig.max_in_memory_mb`):

- **in memory** (small data, the fast path): the whole uint8 dataset moves to the device once;
  each batch is gathered, augmented and normalised there. No workers to tune.
- **streaming** (large data), rows read from disk per batch (pread, see `tlpipe.data.prepared`),
  so memory stays flat in the dataset's size; nothing holds the split:
  - on a CPU device, a `torch.utils.data.DataLoader` whose items are whole batches
    `(epoch, step)`: worker processes read, augment and normalise them (CPU-bound Python
    work, which wants processes);
  - on CUDA, `num_workers` threads read the uint8 rows of the next batches into pinned memory
    (pread releases the GIL), and each batch is copied `non_blocking` to the device, then
    augmented and normalised there as on the in-memory route. Worker processes would hand
    every batch over through a fresh shared-memory segment and one pin-memory thread: on an
    H200 that capped resnet18 at 224 px near 6 500 images/s whatever the number of workers
    (0.70–0.86 of data already on the GPU; benchmarks/gpu_loader.py).

All routes compute the same batches: the order comes from (seed, epoch) and the augmentation
of batch `step` (`augment`) from its own seed, (seed, epoch, step), so a streamed run is
bit-identical to an in-memory one on a CPU, and a resumed run to an uninterrupted one. (On a
GPU, resizing and colour jitter run on the device, whose rounding may differ from a CPU's in
the last bit; the draws are the same.)
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from tlpipe.data.prepared import read_rows, take_rows
from tlpipe.errors import TlpipeError
from tlpipe.params.learning import Augment

Batch = dict[str, torch.Tensor]
Images = np.ndarray | torch.Tensor  # uint8 (N, C, H, W): in memory, memory-mapped, or on device


class Batches(Protocol):
    """What `tlpipe.train.loop.fit` trains on.

    On the streaming route `batch` may run in reader threads (CUDA) for several steps of an
    epoch at once, after its step 0 has returned in the caller's thread (which may cache the
    epoch's order): past that it must not change shared state nor draw from torch's global
    RNG (the caller's augmentation seeds a fork of it meanwhile).
    """

    def __len__(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def to(self, device: torch.device) -> Any: ...

    def batch(self, epoch: int, step: int) -> Batch: ...


def to_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N,C,H,W) → normalised `(x/255 - mean)/std` in torch's default dtype (float32;
    float64 where a test sets it, to compare runs below float32's rounding)."""
    dtype = torch.get_default_dtype()
    m = torch.as_tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return (x.to(dtype) / 255.0 - m) / s


def augment(x: torch.Tensor, cfg: Augment, seed: int) -> torch.Tensor:
    """A uint8 batch (N, C, H, W) augmented by `cfg`; what it gets depends only on `seed`.

    random_resized_crop and color_jitter are `torchvision.transforms.v2` transforms applied
    image by image; they draw from torch's global RNG, so they run in a fork of it seeded from
    `seed` (the caller's RNG is left as it was). pad_crop and hflip are drawn for the whole
    batch from a generator seeded with `seed` (`augment_batch`).
    """
    per_image = _per_image(cfg, (x.shape[-2], x.shape[-1]))
    if per_image is not None and len(x):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed * 31 + 17) % (1 << 63))  # not the generator's own seed
            x = torch.stack([per_image(image) for image in x])
    if cfg.pad_crop or cfg.hflip:
        x = augment_batch(x, torch.Generator().manual_seed(seed), cfg.pad_crop, cfg.hflip)
    return x


ImageOp = Callable[[torch.Tensor], torch.Tensor]


@functools.lru_cache(maxsize=16)
def _per_image(cfg: Augment, size: tuple[int, int]) -> ImageOp | None:
    """The v2 transforms of `cfg` for images of `size`, or None when there are none."""
    from torchvision.transforms import v2

    ops: list[ImageOp] = []
    if (crop := cfg.random_resized_crop) is not None:
        ops.append(v2.RandomResizedCrop(size, scale=crop.scale, ratio=crop.ratio, antialias=True))
    if (c := cfg.color_jitter) is not None:
        ops.append(v2.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue))
    return v2.Compose(ops) if ops else None


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True
) -> torch.Tensor:
    """Translate each image by up to `pad` pixels (zero fill) and mirror half of them, on uint8.

    Draws the offsets (when `pad`) and then the flips from `generator`, one per image.
    """
    n, _, h, w = x.shape
    zeros = torch.zeros(n, dtype=torch.int64)
    dy = torch.randint(-pad, pad + 1, (n,), generator=generator) if pad else zeros
    dx = torch.randint(-pad, pad + 1, (n,), generator=generator) if pad else zeros
    flips = torch.rand(n, generator=generator) < 0.5 if flip else zeros.bool()
    if h * w <= 64 * 64:  # small images: one gather for the batch is faster than n copies
        return _shift_gather(x, dy, dx, flips, pad)
    return _shift_copy(x, dy, dx, flips)


def _shift_gather(x, dy, dx, flips, pad: int) -> torch.Tensor:
    n, _, h, w = x.shape
    dy, dx, flips = (t.to(x.device) for t in (dy + pad, dx + pad, flips))
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
    cols = torch.where(flips[:, None, None], cols.flip(-1), cols)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


def _shift_copy(x, dy, dx, flips) -> torch.Tensor:
    """`_shift_gather` by one slice copy per image: out[r, c] = x[r + dy, c + dx], mirrored."""
    out = torch.zeros_like(x)
    _, _, h, w = x.shape
    for i, (sy, sx, flip) in enumerate(zip(dy.tolist(), dx.tolist(), flips.tolist(), strict=True)):
        src = x[i, :, max(0, sy) : h + min(0, sy), max(0, sx) : w + min(0, sx)]
        rows = slice(max(0, -sy), h - max(0, sy))
        if flip:  # the mirror image of the shifted one: its columns land mirrored too
            out[i, :, rows, max(0, sx) : w + min(0, sx)] = src.flip(-1)
        else:
            out[i, :, rows, max(0, -sx) : w - max(0, sx)] = src
    return out


def step_seed(seed: int, epoch: int, step: int, salt: int = 0) -> int:
    """A generator seed for one (seed, epoch, step): any batch can be drawn on its own."""
    return ((((seed * 1_000_003 + epoch) * 1_000_033 + step) * 7919) + salt) % (1 << 63)


@dataclass(frozen=True)
class Transform:
    """Augmentation (`augment`) then normalisation of a uint8 batch."""

    augment: Augment
    seed: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def augmented(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        if not self.augment.enabled:
            return x
        return augment(x, self.augment, step_seed(self.seed, epoch, step))

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        return to_input(x, self.mean, self.std)


def take(images: Images, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of `images`: indexed on its device, or read from disk / memory."""
    if isinstance(images, torch.Tensor):
        return images[idx.to(images.device)]
    return torch.from_numpy(take_rows(images, idx.cpu().numpy()))


def to_device(images: Images, device: torch.device) -> torch.Tensor:
    """The whole uint8 array on `device` (the in-memory fast path; read in chunks)."""
    if isinstance(images, torch.Tensor):
        return images.to(device)
    rows = read_rows(images, 0, len(images))
    return torch.from_numpy(rows if rows.flags.writeable else rows.copy()).to(device)


class ArrayBatches:
    """Shuffled mini-batches over uint8 images in memory or memory-mapped; nothing is copied.

    Args:
        x: uint8 images (N, C, H, W), e.g. `load_split(...).x`.
        y: int labels (N,).
        weights: optional per-sample loss weights (N,).
        steps_per_epoch: batches per epoch; 0 means one pass (the last short batch kept).
        domain: constant tagged onto every batch (joint training tells target from source).
        rows: train on these rows of `x` only (e.g. the matched source subset), read in place;
            the batches are those of `ArrayBatches(x[rows], y[rows], …)`.
    """

    def __init__(
        self,
        x: Images,
        y: np.ndarray,
        batch_size: int,
        seed: int = 0,
        weights: np.ndarray | None = None,
        steps_per_epoch: int = 0,
        domain: int = 0,
        rows: np.ndarray | None = None,
    ):
        if len(x) != len(y):
            raise TlpipeError(f"{len(x)} images but {len(y)} labels")
        self.rows = None if rows is None else torch.as_tensor(np.asarray(rows, np.int64))
        self.n = len(x) if rows is None else len(rows)
        if self.n == 0:
            raise TlpipeError("no training images: check the scenario's classes and k")
        self.x = x
        self.y = torch.tensor(np.asarray(y), dtype=torch.int64)  # labels: 8 bytes an image
        self.w = None if weights is None else torch.tensor(np.asarray(weights), dtype=torch.float32)
        self.batch_size = min(batch_size, self.n)
        self.seed = seed
        self.domain = domain
        self.steps = steps_per_epoch or math.ceil(self.n / self.batch_size)
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.steps

    @property
    def nbytes(self) -> int:
        return int(self.x[:1].nbytes) * self.n if len(self.x) else 0

    def to(self, device: torch.device) -> ArrayBatches:
        """Move the images trained on to `device` once (uint8: 4× less traffic than float)."""
        if self.rows is not None:  # only the rows trained on: at most the in-memory limit
            rows = self.rows.numpy()
            self.x, self.y = torch.from_numpy(take_rows(self.x, rows)), self.y[self.rows]
            self.w = None if self.w is None else self.w[self.rows]
            self.rows = None
        self.x, self.y = to_device(self.x, device), self.y.to(device)
        if self.w is not None:
            self.w = self.w.to(device)
        self._order = None
        return self

    def order(self, epoch: int) -> torch.Tensor:
        """This epoch's sample order: reshuffled passes over the data, from (seed, epoch)."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            n, b = self.n, self.batch_size
            passes = math.ceil(self.steps * b / n)
            order = torch.cat([torch.randperm(n, generator=g) for _ in range(passes)])
            if self.rows is not None:
                order = self.rows[order]
            self._order = (epoch, order.to(self.y.device))
        return self._order[1]

    def batch(self, epoch: int, step: int) -> Batch:
        idx = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        batch = {"x": take(self.x, idx), "y": self.y[idx]}
        if self.w is not None:
            batch["w"] = self.w[idx]
        batch["domain"] = torch.full_like(batch["y"], self.domain)
        return batch

    def epoch(self, epoch: int) -> Iterator[Batch]:
        return (self.batch(epoch, step) for step in range(self.steps))


Shard = Callable[[Batch], Batch]


def _whole(batch: Batch) -> Batch:
    return batch


class _Steps(torch.utils.data.Dataset):
    """Item (epoch, step) = that batch, read and augmented (and normalised) in a worker."""

    def __init__(self, train: Batches, transform: Transform, normalise: bool, shard: Shard):
        self.train, self.transform, self.normalise, self.shard = train, transform, normalise, shard

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        epoch, step = key
        batch = self.train.batch(epoch, step)
        batch["x"] = self.transform.augmented(batch["x"], epoch, step)
        batch = self.shard(batch)
        x = batch.pop("x")
        if self.normalise:
            batch["input"] = self.transform.normalised(x)
        else:  # on a GPU: uint8 over the bus, normalised on the device (4× less traffic)
            batch["x"] = x
        return batch


class _EpochSteps(torch.utils.data.Sampler):
    """Yields (epoch, 0), (epoch, 1), …; `epoch` is set before each pass."""

    def __init__(self, steps: int):
        self.steps, self.epoch = steps, 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, step) for step in range(self.steps))


READERS = ("auto", "threads", "processes")


def streaming_reader(device: torch.device, reader: str = "auto") -> str:
    """The streaming route's reader on `device`: `reader`, or for ``auto`` threads on CUDA
    and worker processes elsewhere (see the module docstring)."""
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    if reader == "auto":
        return "threads" if device.type == "cuda" else "processes"
    return reader


class Feed:
    """Batches of `train` on `device`, each with a normalised "input": in memory or streamed.

    Args:
        max_in_memory_mb: data up to this size (uint8 images) takes the in-memory fast path.
        num_workers: reader threads (CUDA) or DataLoader worker processes (CPU) on the
            streaming path (0: read in-process).
        shard: this rank's rows of an augmented global batch (`tlpipe.train.distributed.shard`);
            default all of them (one process).
        reader: the streaming reader: ``auto`` (threads on CUDA, processes elsewhere),
            ``threads`` or ``processes``.
    """

    def __init__(
        self,
        train: Batches,
        transform: Transform,
        device: torch.device,
        max_in_memory_mb: float,
        num_workers: int = 2,
        shard: Shard | None = None,
        reader: str = "auto",
    ):
        self.train, self.transform, self.device = train, transform, device
        self.shard = shard or _whole
        reader = streaming_reader(device, reader)
        self.streaming = train.nbytes > max_in_memory_mb * (1 << 20)
        if not self.streaming:
            train.to(device)
            return
        self.threads = num_workers if reader == "threads" else None
        if self.threads is not None:
            return
        self.sampler = _EpochSteps(len(train))
        self.loader = torch.utils.data.DataLoader(
            _Steps(train, transform, normalise=device.type == "cpu", shard=self.shard),
            batch_size=None,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            generator=torch.Generator(),  # the loader's seed draw leaves the global RNG alone
        )

    def __len__(self) -> int:
        return len(self.train)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if not self.streaming:
            for step in range(len(self.train)):
                yield self._on_device(self.train.batch(epoch, step), epoch, step)
            return
        if self.threads is not None:
            yield from self._threaded(epoch)
            return
        self.sampler.epoch = epoch
        for batch in self.loader:
            batch = self._to_device(batch)
            if "input" not in batch:
                batch["input"] = self.transform.normalised(batch["x"])
            yield batch

    def _on_device(self, batch: Batch, epoch: int, step: int) -> Batch:
        """Augment, shard and normalise a uint8 global batch that is on the device already."""
        batch["x"] = self.transform.augmented(batch["x"], epoch, step)
        batch = self.shard(batch)
        batch["input"] = self.transform.normalised(batch["x"])
        return batch

    def _threaded(self, epoch: int) -> Iterator[Batch]:
        """This epoch's batches, read ahead by `self.threads` threads (into pinned memory on
        CUDA), at most 2 per thread, and yielded in step order; a reader's error is raised
        here, at its batch. Closing the generator (early stop, an error in training) cancels
        the reads not started and waits for the running ones: no reader thread outlives it."""
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        steps = len(self.train)

        def read(step: int) -> Batch:
            batch = self.train.batch(epoch, step)
            return {k: v.pin_memory() for k, v in batch.items()} if pin else batch

        def ready(batch: Batch, step: int) -> Batch:
            return self._on_device(self._to_device(batch), epoch, step)

        if steps == 0:
            return
        if not self.threads:  # 0: all read in-process, as DataLoader's num_workers=0
            for step in range(steps):
                yield ready(read(step), step)
            return
        first = read(0)  # in this thread: the epoch's order is drawn before any reader runs
        todo = iter(range(1, steps))
        ahead: collections.deque = collections.deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="tlpipe-reader") as pool:
            try:
                for step in itertools.islice(todo, 2 * self.threads):
                    ahead.append((step, pool.submit(read, step)))
                batch = ready(first, 0)  # step 0 goes while the readers read what follows
                del first
                yield batch
                while ahead:
                    step, future = ahead.popleft()
                    if (more := next(todo, None)) is not None:  # keep 2 a thread in flight
                        ahead.append((more, pool.submit(read, more)))
                    batch = ready(future.result(), step)
                    del future
                    yield batch
            finally:  # closed early or failed: drop what was not started, wait for the rest
                for _, pending in ahead:
                    pending.cancel()

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
