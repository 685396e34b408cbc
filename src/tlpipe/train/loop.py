"""The one training loop, used by pretrain, the scratch baseline and every fine-tune strategy.

Strategies differ only in what they pass in: which parameters train with which learning rate
(`param_groups`), an optional `penalty` (L2-SP), and an optional `loss_fn` (joint training).
Batches come through `tlpipe.data.loader.Feed`: small data lives on the device as uint8 and is
augmented (`TrainConfig.augment`, `tlpipe.data.loader.augment`) and normalised there; larger data
streams from the memory-mapped split: on CUDA read ahead by threads into pinned memory and
augmented on the device, on a CPU through a DataLoader whose worker processes augment it. Either way
batch order and augmentation depend only on (seed, epoch, step), which makes a resumed run see
exactly the batches the killed one would have, and a streamed run the same batches as an
in-memory one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlpipe.data.loader import (
    ArrayBatches,
    Batch,
    Batches,
    Feed,
    Transform,
    augment_batch,
    to_input,
)
from tlpipe.data.prepared import chunks, read_rows
from tlpipe.errors import TlpipeError
from tlpipe.params import TrainConfig
from tlpipe.train import distributed, resume
from tlpipe.train.distributed import World

__all__ = ["ArrayBatches", "Batch", "TrainConfig", "augment_batch", "fit", "predict", "to_input"]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class FitResult:
    """What `fit` returns; the model itself is left holding the best weights."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")
    seconds: float = 0.0
    resumed_from: int = 0


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TlpipeError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    """Plain (optionally sample-weighted) cross-entropy on the model's output."""

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        losses = F.cross_entropy(
            model(batch["input"]), batch["y"], label_smoothing=label_smoothing, reduction="none"
        )
        if "w" in batch:
            return (losses * batch["w"]).sum() / batch["w"].sum().clamp_min(1e-12)
        return losses.mean()

    return loss_fn


def fit(
    model: nn.Module,
    train: Batches,
    cfg: TrainConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    val: tuple[np.ndarray, np.ndarray] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    loss_fn: LossFn | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    checkpoint: Path | None = None,
    resume_key: str = "",
    desc: str = "train",
) -> FitResult:
    """Train `model` and leave it holding the weights of the best validation epoch.

    Args:
        train: the batches (`ArrayBatches`, `JointBatches`: see `tlpipe.data.loader.Batches`); kept
            in memory on the device up to `cfg.max_in_memory_mb`, else streamed from disk.
        mean, std: per-channel normalisation: the data's, or the pretrained weights' own
            (ImageNet's for torchvision weights; `tlpipe.train.models.Weights.normalisation`).
        val: (x, y) used for model selection; without it the last epoch is kept. Capped at
            `cfg.val_max_images` (a fixed subset) per epoch.
        param_groups: `[{"params": [...], "lr_scale": s}, ...]`; default all trainable params.
        loss_fn: `(model, batch) -> loss`; batch has `input` (normalised) plus the raw keys.
        penalty: extra loss term (L2-SP), called once per step.
        checkpoint: file rewritten every epoch; if it exists, training resumes after it —
            unless it was written with another `cfg` or `resume_key` (the caller's inputs:
            data, starting model, settings): then it is stale and training starts over.
        desc: progress-bar label.
    """
    w = distributed.world()
    device = distributed.setup(resolve_device(cfg.device))  # cuda:LOCAL_RANK under torchrun
    val = cap_validation(val, cfg.val_max_images, cfg.seed)
    torch.manual_seed(cfg.seed)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    transform = Transform(cfg.augment, cfg.seed, tuple(mean), tuple(std))
    shard = functools.partial(distributed.shard, w=w) if w.active else None
    feed = Feed(train, transform, device, cfg.max_in_memory_mb, cfg.num_workers, shard)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer, scheduler = _optimizer(groups, cfg, total_steps=cfg.epochs * len(train))
    result, best_state, start = FitResult(), None, 0
    key = f"{cfg!r}|{resume_key}"
    state = None  # rank 0 reads the resume file; the other ranks get its state
    if w.main and checkpoint is not None and checkpoint.exists():
        state = resume.load(checkpoint, device, desc, key)
    if w.active:
        state = distributed.broadcast_state(state)
    if state is not None:
        start, best_state = resume.restore(state, model, optimizer, scheduler, result)
        _say(w, f"{desc}: resuming after epoch {start}/{cfg.epochs} from {checkpoint}")
    loss_fn = loss_fn or cross_entropy(cfg.label_smoothing)
    step_loss, swapped = _step_loss(model, loss_fn, penalty, device, w)
    if w.active:
        print(
            f"{desc}: {w} trains its shard of each global batch, {len(feed)} steps an epoch",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.perf_counter()
    try:
        for epoch in range(start, cfg.epochs):
            label = f"{desc} {epoch + 1}/{cfg.epochs}"
            loss = _train_one_epoch(model, step_loss, feed, epoch, optimizer, scheduler, label)
            row = {"epoch": epoch + 1, "train_loss": loss, "lr": scheduler.get_last_lr()[0]}
            if val is not None:
                row["val_accuracy"] = accuracy(model, *val, mean=mean, std=std, world=w)
            result.history.append(row)
            if not sys.stderr.isatty():  # pod logs, CI, DVC stages: one line per epoch, no bars
                scores = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
                _say(w, f"{desc} epoch {epoch + 1}/{cfg.epochs}: {scores}")
            if val is None or row["val_accuracy"] >= result.best_val_accuracy or best_state is None:
                result.best_epoch, result.best_val_accuracy = (
                    epoch + 1,
                    row.get("val_accuracy", 0.0),
                )
                best_state = copy.deepcopy(model.state_dict())
            if checkpoint is not None and w.main:  # rank 0 alone writes
                resume.save(
                    checkpoint, model, optimizer, scheduler, result, best_state, epoch, desc, key
                )
    finally:
        distributed.restore_batchnorm(swapped)
    result.seconds = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    if val is None:
        result.best_val_accuracy = float("nan")
    return result


def cap_validation(val, cap: int, seed: int):
    """At most `cap` rows of `val` (x, y), a fixed seeded subset in their order; 0 = all."""
    if val is None or not cap or len(val[1]) <= cap:
        return val
    rows = np.sort(np.random.default_rng(seed).choice(len(val[1]), cap, replace=False))
    return val[0][rows], val[1][rows]


def _say(w: World, line: str) -> None:
    """A progress line on stderr, from rank 0 only."""
    if w.main:
        print(line, file=sys.stderr, flush=True)


def _step_loss(model, loss_fn, penalty, device, w):
    """The loss of one (this rank's) batch, as a function whose backward gives the gradient.

    In one process: `loss_fn` (+ `penalty`). Distributed: the same inside DDP, each rank's loss
    scaled by its share of the global batch, so DDP's average of the ranks' gradients is the
    one-process gradient; BatchNorm synchronised over the ranks (see `tlpipe.train.distributed`).
    Returns (the function, the BatchNorm swaps to undo after training).
    """

    def loss(batch: Batch) -> torch.Tensor:
        value = loss_fn(model, batch)
        return value + penalty() if penalty is not None else value

    if not w.active:
        return loss, []
    swapped = distributed.sync_batchnorm(model, device)

    def share(batch: Batch) -> torch.Tensor:  # this rank's rows / the global batch's, times W
        n = torch.tensor([float(len(batch["y"]))], device=device)
        total = distributed.all_reduce_sum(n.clone())
        return loss(batch) * (n * w.size / total).squeeze()

    ddp = distributed.data_parallel(model, share, device)
    return ddp, swapped


def _train_one_epoch(model, step_loss, feed, epoch, optimizer, scheduler, desc) -> float:
    from tqdm.auto import tqdm

    model.train()
    _freeze_frozen_batchnorm(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=_on_cuda(model))
    total = torch.zeros((), device=next(model.parameters()).device)
    # closed on the way out: an error in a step stops the streaming readers at once
    with contextlib.closing(feed.epoch(epoch)) as batches:
        bar = tqdm(
            batches,
            total=len(feed),
            desc=desc,
            leave=False,
            disable=not sys.stderr.isatty(),
            unit="batch",
        )
        for step, batch in enumerate(bar):  # batch["input"]: augmented and normalised (Feed)
            if _on_cuda(model):
                batch["input"] = batch["input"].contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = step_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach()
            # 1) NaN/inf check every 50 steps and at the end: a per-step .item() would sync the GPU
            if (step + 1) % 50 == 0 or step + 1 == len(feed):
                _check_finite(total, epoch, step)
    # 2) distributed: each rank's loss is scaled to its share, so the mean over ranks is the
    # one-process loss of the global batch
    world_size = distributed.world().size
    return distributed.all_reduce_sum(total).item() / world_size / len(feed)


def _check_finite(total: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(total):
        raise TlpipeError(
            f"training loss became NaN/inf by epoch {epoch + 1}, step {step + 1}: "
            "lower the learning rate (lr) or check the input data"
        )


def _on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


def _freeze_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen keep their running statistics."""
    for m in model.modules():
        frozen = not any(p.requires_grad for p in m.parameters())
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and frozen:
            m.eval()


def _optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, total_steps: int):
    groups = [
        {
            "params": g["params"],
            "lr": cfg.lr * g.get("lr_scale", 1.0),
            "weight_decay": g.get("weight_decay", cfg.weight_decay),
        }
        for g in groups
        if len(g["params"])
    ]
    if not groups:
        raise TlpipeError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    max_lrs = [g["lr"] for g in groups]
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=max_lrs,
            total_steps=max(total_steps, 2),
            pct_start=cfg.warmup_frac,
            cycle_momentum=False,
        )
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def true_class_log_probability(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per image, the log softmax probability that `logits` (N, K) give label `y` (N,)."""
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return log_p[np.arange(len(y)), y]


@torch.no_grad()
def predict(
    model: nn.Module,
    x: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    features: bool = False,
) -> np.ndarray:
    """Logits (or backbone features with `features=True`) for uint8 images, in batches.

    `x` may be memory-mapped: it is read one chunk at a time (no float copy of the split).
    """
    model.eval()
    device = next(model.parameters()).device
    fn = model.backbone if features else model
    outs = []
    for start, stop in chunks(x, chunk_bytes=max(1, x[:1].nbytes) * batch_size):
        xb = to_input(torch.from_numpy(read_rows(x, start, stop)).to(device), mean, std)
        outs.append(fn(xb).float().cpu().numpy())
    width = model.feat_dim if features else model.head.out_features
    return np.concatenate(outs) if outs else np.zeros((0, width), np.float32)


def embed(model: nn.Module, x: np.ndarray, mean, std, batch_size: int = 512) -> np.ndarray:
    """Backbone features for uint8 images (no grad, batched)."""
    return predict(model, x, mean, std, batch_size, features=True)


def accuracy(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, mean, std, world: World | None = None
) -> float:
    """Top-1 accuracy on (x, y); distributed (`world`), each rank scores its slice of the rows."""
    if len(x) == 0:
        return float("nan")
    if world is None or not world.active:
        return float((predict(model, x, mean, std).argmax(1) == y).mean())
    lo, hi = len(x) * world.rank // world.size, len(x) * (world.rank + 1) // world.size
    correct = int((predict(model, x[lo:hi], mean, std).argmax(1) == y[lo:hi]).sum())
    device = next(model.parameters()).device
    total = distributed.all_reduce_sum(torch.tensor(float(correct), device=device))
    return float(total.item()) / len(x)
