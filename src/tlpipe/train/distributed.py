"""Data-parallel training under torchrun (or any launcher that sets the torch.distributed vars).

    torchrun --nproc_per_node=2 -m tlpipe pretrain …      # one machine, two processes
    (a Kubeflow Trainer TrainJob starts the same command on each node: `tlpipe.kfp.trainjob`)

Without `WORLD_SIZE` > 1 in the environment nothing here does anything, and training is what it
is in one process. With it, `tlpipe.train.loop.fit`:

- joins the process group (nccl on a GPU, gloo on a CPU) and trains on `cuda:LOCAL_RANK`;
- keeps tlpipe's deterministic (seed, epoch, step) batches and gives each rank its shard of
  every global batch (`shard`: rows rank, rank+W, …), so `batch_size` stays the *global* batch
  and W processes train on what one process would;
- wraps model + loss in DistributedDataParallel (`Replica`), scaling each rank's loss by its
  share of the batch so the averaged gradient is the one-process gradient;
- synchronises BatchNorm across ranks (`sync_batchnorm`): the statistics of the global batch,
  not of each rank's 1/W of it. Chosen for parity: a fine-tune batch of 64 split over 8 GPUs
  would normalise over 8 images, and the result would depend on the number of workers. The
  cost is two small all-reduces per BatchNorm layer per step;
- all-reduces the reported train loss and the validation counts, so every rank selects the
  same best epoch;
- lets rank 0 alone read and write resume files (the state is broadcast to the others, which
  need not share its disk) and print progress. The runner keeps the other ranks untracked and
  writing nothing (`tlpipe.runner.run_step`).

Known differences from one process: a weighted loss (joint's match weights) is averaged per
rank, which equals the one-process loss only when the ranks' weight sums are equal; stochastic
layers (dropout, stochastic depth) draw per rank. Each rank augments the whole global batch and
keeps its shard: exact, at W times the augmentation work.
"""

from __future__ import annotations

import atexit
import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class World:
    """This process's place in the job (from torchrun's environment variables)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.size}"


def world() -> World:
    """The launcher's view: RANK, WORLD_SIZE, LOCAL_RANK (one process without them)."""
    env = os.environ
    rank, size, local = (
        int(env.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))
    )
    return World(rank, size, local)


def is_main() -> bool:
    """True unless this process is a non-zero rank of a distributed job."""
    return world().main


def setup(device: torch.device) -> torch.device:
    """Join the process group once (if launched distributed); the device this rank trains on."""
    w = world()
    if not w.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: Batch, w: World) -> Batch:
    """This rank's rows of a global batch: rank, rank + W, … (mixed batches stay mixed)."""
    return {k: v[w.rank :: w.size] for k, v in batch.items()}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks (in place; returned for convenience). A no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast_bytes(data: bytes | None) -> bytes | None:
    """Rank 0's `data` on every rank (the others pass anything)."""
    if not dist.is_initialized():
        return data
    box = [data]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_state(state: dict | None) -> dict | None:
    """Rank 0's state dict (tensors, as `torch.save` writes them) on every rank."""
    if not dist.is_initialized():
        return state
    buffer = io.BytesIO()
    if state is not None:
        torch.save(state, buffer)
    data = broadcast_bytes(buffer.getvalue() if state is not None else None)
    if data is None:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class Replica(nn.Module):
    """Model + loss as one module, so that DistributedDataParallel sees every forward.

    The losses call parts of the model (`backbone`, a second head), which DDP would not see if
    called on the bare model; here they all run inside DDP's forward.
    """

    def __init__(self, model: nn.Module, loss: Callable[[Batch], torch.Tensor]):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(batch)


def data_parallel(
    model: nn.Module, loss: Callable[[Batch], torch.Tensor], device: torch.device
) -> nn.Module:
    """`loss` over `model` wrapped in DDP (gradients averaged over ranks during backward).

    `static_graph`: the same parameters take part in every step of one `fit` (a source head
    that a zero source weight leaves out is simply never waited for), found out once.
    """
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        Replica(model, loss),
        device_ids=ids,
        static_graph=True,
        gradient_as_bucket_view=True,  # gradients live in DDP's buckets: no second copy
    )


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) that autograd can see through: the gradient is summed over ranks too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


# ---------------------------------------------------------------------------- BatchNorm


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the global batch of all ranks, on any device (gloo included).

    torch's SyncBatchNorm does this on GPUs only; this is the same computation, written with
    differentiable all-reduces (two passes: the mean, then the squared deviations). Outside
    training, or in one process, it is plain BatchNorm2d. Same parameters and buffers, so
    state dicts and checkpoints do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _SumOverRanks.apply
        dims = (0, 2, 3)
        count = all_reduce(x.new_tensor([x.numel() / x.shape[1]]))
        mean = all_reduce(x.sum(dims)) / count
        centred = x - mean.view(1, -1, 1, 1)
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum
                if factor is None:  # a cumulative average, as BatchNorm's momentum=None
                    factor = 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(unbiased.detach(), factor)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


Swaps = list[tuple[nn.Module, str, nn.Module]]  # (parent, attribute, the original BatchNorm2d)


def sync_batchnorm(model: nn.Module, device: torch.device) -> Swaps:
    """Swap every BatchNorm2d for its synchronised form (same parameters); the undo list.

    GPU: torch's SyncBatchNorm (its fused kernels); elsewhere `GlobalBatchNorm2d`.
    """
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.BatchNorm2d:
                continue
            kind = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm2d
            new = _same_state(child, kind)
            setattr(parent, name, new)
            swapped.append((parent, name, child))
    return swapped


def restore_batchnorm(swapped: Swaps) -> None:
    """Put back the original BatchNorm2d modules (they share the trained parameters and buffers)."""
    for parent, name, original in swapped:
        current = getattr(parent, name)
        original.train(current.training)
        setattr(parent, name, original)


def _same_state(bn: nn.BatchNorm2d, cls: type[nn.Module]) -> nn.Module:
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    return new.train(bn.training)
