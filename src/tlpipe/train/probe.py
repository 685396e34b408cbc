"""The linear probe solved on fixed features: logistic regression trained to convergence.

The training loop's SGD head (`finetune.probe`: 10 epochs × 10 steps) converges only where the
backbone's features happen to have a scale near 1; a weakly pretrained backbone's are far from
it, and 100 steps leave its head near chance where the same features classify well
(benchmarks/README.md, "The linear probe, solved"). So the probe embeds the training images once
(un-augmented, the backbone in eval mode), centres the features and divides them all by one
scale, to a mean squared norm of 1, and fits multinomial logistic regression with L-BFGS in
float64: the mean cross-entropy + l2 / (2N) · ‖W‖² (scikit-learn's `LogisticRegression` with
C = 1 / l2; the bias is not penalised). l2 is chosen by stratified k-fold CV on the same
training images (held-out log-likelihood, `L2_GRID`) unless set. Centre and scale fold back
into the head: the model is the same network, exported as before.

One scale, not one per feature (scikit-learn's StandardScaler): a near-constant feature (a ReLU
channel that rarely fires) would get a weight in the tens of thousands, which INT8 cannot hold
(measured: argmax agreement 0.967 with fp32) and which a test image where it fires would swing.
Kornblith et al. (2019) and LP-FT (Kumar et al., 2022) fit their probes as logistic regression
on fixed features, choosing the L2 strength on held-out data.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlpipe.data.prepared import stratified_folds
from tlpipe.errors import TlpipeError
from tlpipe.train import distributed
from tlpipe.train.loop import FitResult, accuracy, embed, resolve_device

L2_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # the candidates of `probe_l2: auto`
CV_FOLDS = 5  # at most; fewer where a class has fewer training images


def solve_head(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    l2: float | str = "auto",
    val: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
    device: str = "auto",
    desc: str = "probe",
) -> FitResult:
    """Set `model.head` to the L2 logistic regression of labels `y` on the backbone's features
    of images `x` (`l2` "auto": chosen by CV, folds seeded by `seed`); the backbone is left as
    it is. One history row (epoch 1): the final mean cross-entropy, l2 and, with `val`, its
    accuracy. The images are embedded on `device` (the GPU where there is one, as `fit` trains);
    the regression is solved on the CPU."""
    head = model.head
    if not isinstance(head, nn.Linear):
        raise TlpipeError(f"finetune.probe_solver lbfgs needs a linear head, not {head!r}")
    t0 = time.perf_counter()
    model.to(distributed.setup(resolve_device(device)))
    f = torch.from_numpy(embed(model, x, mean, std)).double()
    mu = f.mean(0)
    scale = float((f - mu).pow(2).sum(1).mean().sqrt()) or 1.0  # mean squared norm → 1
    z = (f - mu) / scale
    labels = torch.from_numpy(np.asarray(y)).long()
    how = "set"
    if l2 == "auto":
        l2, how = choose_l2(z, labels, head.out_features, seed)
    w, b = logistic(z, labels, head.out_features, float(l2))
    with torch.no_grad():
        scaled = w / scale  # head(f) = w · (f − μ) / scale + b
        head.weight.copy_(scaled.to(head.weight))
        head.bias.copy_((b - scaled @ mu).to(head.bias))
        train_loss = float(F.cross_entropy(z @ w.T + b, labels))
    row: dict[str, float] = {"epoch": 1, "train_loss": train_loss, "l2": float(l2)}
    if val is not None:
        row["val_accuracy"] = accuracy(model, *val, mean=mean, std=std)
    if distributed.world().main:  # one line, also in pod logs (ranks solve the same problem)
        scores = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "l2"))
        print(
            f"{desc}: logistic regression on {z.shape[1]} features of {len(labels)} images, "
            f"l2 {l2:g} ({how}): {scores}",
            file=sys.stderr,
            flush=True,
        )
    best = row.get("val_accuracy", float("nan"))
    return FitResult([row], best_epoch=1, best_val_accuracy=best, seconds=time.perf_counter() - t0)


def logistic(
    z: torch.Tensor, labels: torch.Tensor, classes: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising the mean cross-entropy + l2 / (2N) · ‖W‖² on features `z` (float64)."""
    w = torch.zeros(classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=1000,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    penalty = 0.5 * l2 / max(len(labels), 1)

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels) + penalty * (w**2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    return w.detach(), b.detach()


def choose_l2(z: torch.Tensor, labels: torch.Tensor, classes: int, seed: int) -> tuple[float, str]:
    """The `L2_GRID` value with the best held-out log-likelihood over stratified folds of the
    training images (ties: the stronger penalty), and how it was chosen. A class with a single
    image leaves nothing to hold out: l2 = 1 (scikit-learn's default)."""
    y = labels.numpy()
    counts = np.unique(y, return_counts=True)[1]
    k = min(CV_FOLDS, int(counts.min()) if counts.size else 0)
    if k < 2:
        return 1.0, "a class has 1 image: no CV, the default"
    fold = torch.from_numpy(stratified_folds(y, k, seed))
    scores = []
    for l2 in L2_GRID:
        held_out = 0.0
        for i in range(k):
            fit, held = fold != i, fold == i
            w, b = logistic(z[fit], labels[fit], classes, l2)
            logits = z[held] @ w.T + b
            held_out += float(-F.cross_entropy(logits, labels[held], reduction="sum"))
        scores.append(held_out)
    best = max(range(len(L2_GRID)), key=lambda i: (scores[i], L2_GRID[i]))
    return L2_GRID[best], f"{k}-fold CV over {len(L2_GRID)} values"
