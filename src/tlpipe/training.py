"""The one training loop, used by pretrain, the scratch baseline and every fine-tune strategy.

Strategies differ only in what they pass in: which parameters train with which learning rate
(`param_groups`), an optional `penalty` (L2-SP), and an optional `loss_fn` (joint training).
Data lives in memory as uint8 tensors and is normalised per batch on the device, so the loop
has no DataLoader workers to tune; batch order depends only on (seed, epoch), which makes a
resumed run see exactly the batches the killed one would have.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlpipe import resume
from tlpipe.errors import TlpipeError
from tlpipe.params import TrainConfig

Batch = dict[str, torch.Tensor]
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


def to_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N,C,H,W) → normalised float32 `(x/255 - mean)/std`."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


class ArrayBatches:
    """Shuffled mini-batches over in-memory arrays.

    Args:
        x: uint8 images (N, C, H, W).
        y: int labels (N,).
        weights: optional per-sample loss weights (N,).
        steps_per_epoch: batches per epoch; 0 means one pass (the last short batch kept).
        domain: constant tagged onto every batch (joint training tells target from source).
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        seed: int = 0,
        weights: np.ndarray | None = None,
        steps_per_epoch: int = 0,
        domain: int = 0,
    ):
        if len(x) == 0:
            raise TlpipeError("no training images: check the scenario's classes and k")
        if len(x) != len(y):
            raise TlpipeError(f"{len(x)} images but {len(y)} labels")
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.batch_size = min(batch_size, len(x))
        self.seed = seed
        self.domain = domain
        self.steps = steps_per_epoch or math.ceil(len(x) / self.batch_size)

    def __len__(self) -> int:
        return self.steps

    def to(self, device: torch.device) -> ArrayBatches:
        """Move the whole dataset to `device` once (images stay uint8: 4× less traffic)."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        if self.w is not None:
            self.w = self.w.to(device)
        return self

    def epoch(self, epoch: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n, b = len(self.x), self.batch_size
        passes = math.ceil(self.steps * b / n)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(passes)])
        order = order.to(self.x.device)
        for step in range(self.steps):
            idx = order[step * b : (step + 1) * b]
            batch = {"x": self.x[idx], "y": self.y[idx]}
            if self.w is not None:
                batch["w"] = self.w[idx]
            batch["domain"] = torch.full_like(batch["y"], self.domain)
            yield batch


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels and horizontal flip, per image, on uint8."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
    flip = torch.rand(n, generator=generator).to(x.device) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


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
    train: ArrayBatches,
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
        train: the batches (or anything with `__len__`, `to(device)` and `epoch(i)`).
        mean, std: per-channel normalisation applied on the device.
        val: (x, y) used for model selection; without it the last epoch is kept.
        param_groups: `[{"params": [...], "lr_scale": s}, ...]`; default all trainable params.
        loss_fn: `(model, batch) -> loss`; batch has `input` (normalised) plus the raw keys.
        penalty: extra loss term (L2-SP), called once per step.
        checkpoint: file rewritten every epoch; if it exists, training resumes after it —
            unless it was written with another `cfg` or `resume_key` (the caller's inputs:
            data, starting model, settings): then it is stale and training starts over.
        desc: progress-bar label.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    train.to(device)
    loss_fn = loss_fn or cross_entropy(cfg.label_smoothing)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer, scheduler = _optimizer(groups, cfg, total_steps=cfg.epochs * len(train))
    result, best_state, start = FitResult(), None, 0
    key = f"{cfg!r}|{resume_key}"
    if checkpoint is not None and checkpoint.exists():
        start, best_state = resume.restore(
            checkpoint, model, optimizer, scheduler, result, desc, key
        )
        if start:
            print(f"{desc}: resuming after epoch {start}/{cfg.epochs} from {checkpoint}",
                  file=sys.stderr)  # fmt: skip
    aug_gen = torch.Generator()
    t0 = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        aug_gen.manual_seed(cfg.seed * 7919 + epoch)  # per epoch, so a resumed run matches
        train_loss = _train_one_epoch(
            model, train, epoch, optimizer, scheduler, loss_fn, penalty, cfg, mean, std,
            aug_gen, f"{desc} {epoch + 1}/{cfg.epochs}",
        )  # fmt: skip
        row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}
        if val is not None:
            row["val_accuracy"] = accuracy(model, *val, mean=mean, std=std)
        result.history.append(row)
        if not sys.stderr.isatty():  # pod logs, CI, DVC stages: one line per epoch, no bars
            scores = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
            print(f"{desc} epoch {epoch + 1}/{cfg.epochs}: {scores}", file=sys.stderr, flush=True)
        if val is None or row["val_accuracy"] >= result.best_val_accuracy or best_state is None:
            result.best_epoch, result.best_val_accuracy = epoch + 1, row.get("val_accuracy", 0.0)
            best_state = copy.deepcopy(model.state_dict())
        if checkpoint is not None:
            resume.save(checkpoint, model, optimizer, scheduler, result, best_state, epoch,
                         desc, key)  # fmt: skip
    result.seconds = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    if val is None:
        result.best_val_accuracy = float("nan")
    return result


def _train_one_epoch(
    model, train, epoch, optimizer, scheduler, loss_fn, penalty, cfg, mean, std, aug_gen, desc
) -> float:
    from tqdm.auto import tqdm

    model.train()
    _freeze_frozen_batchnorm(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=_on_cuda(model))
    total = torch.zeros((), device=next(model.parameters()).device)
    bar = tqdm(train.epoch(epoch), total=len(train), desc=desc, leave=False,
               disable=not sys.stderr.isatty(), unit="batch")  # fmt: skip
    for step, batch in enumerate(bar):
        x = augment_batch(batch["x"], aug_gen) if cfg.augment else batch["x"]
        batch["input"] = to_input(x, mean, std)
        if _on_cuda(model):
            batch["input"] = batch["input"].contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = loss_fn(model, batch)
            if penalty is not None:
                loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach()
        # 1) NaN/inf check every 50 steps and at the end: a per-step .item() would sync the GPU
        if (step + 1) % 50 == 0 or step + 1 == len(train):
            _check_finite(total, epoch, step)
    return total.item() / len(train)


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
        {"params": g["params"], "lr": cfg.lr * g.get("lr_scale", 1.0),
         "weight_decay": g.get("weight_decay", cfg.weight_decay)}
        for g in groups
        if len(g["params"])
    ]  # fmt: skip
    if not groups:
        raise TlpipeError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    max_lrs = [g["lr"] for g in groups]
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=max_lrs, total_steps=max(total_steps, 2),
            pct_start=cfg.warmup_frac, cycle_momentum=False,
        )  # fmt: skip
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


@torch.no_grad()
def predict(
    model: nn.Module,
    x: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    features: bool = False,
) -> np.ndarray:
    """Logits (or backbone features with `features=True`) for uint8 images, in batches."""
    model.eval()
    device = next(model.parameters()).device
    fn = model.backbone if features else model
    outs = []
    for i in range(0, len(x), batch_size):
        xb = to_input(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(device),
                      mean, std)  # fmt: skip
        outs.append(fn(xb).float().cpu().numpy())
    width = model.feat_dim if features else model.head.out_features
    return np.concatenate(outs) if outs else np.zeros((0, width), np.float32)


def embed(model: nn.Module, x: np.ndarray, mean, std, batch_size: int = 512) -> np.ndarray:
    """Backbone features for uint8 images (no grad, batched)."""
    return predict(model, x, mean, std, batch_size, features=True)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, *, mean, std) -> float:
    if len(x) == 0:
        return float("nan")
    return float((predict(model, x, mean, std).argmax(1) == y).mean())
