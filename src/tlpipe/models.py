"""Model registry: `build_model(name, num_classes, in_chans)` → a `Net` with a backbone/head split.

Every model is a `Net`: `backbone` maps images to a flat feature vector, `head` is one linear
layer. Transfer strategies only ever touch these two parts (and `blocks()`, the backbone's
stages in input→output order, for partial fine-tuning), so adding a model means adding one
builder to `MODELS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlpipe.errors import TlpipeError
from tlpipe.fsio import atomic_path


class Net(nn.Module):
    """A classifier split into `backbone` (features) and `head` (linear)."""

    def __init__(self, stages: list[nn.Module], feat_dim: int, num_classes: int):
        super().__init__()
        self.backbone = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat_dim = feat_dim
        self.head = nn.Linear(feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def blocks(self) -> list[nn.Module]:
        """Backbone stages from input to output (the pooling tail excluded)."""
        return list(self.backbone.children())[:-2]


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def small_cnn(num_classes: int, in_chans: int = 1, input_size: int = 28, weights=None) -> Net:
    """A 4-stage VGG-style CNN sized for 28×28 inputs (about 0.1 M parameters, CPU-friendly)."""
    stages = [
        _conv_bn(in_chans, 16),
        nn.Sequential(_conv_bn(16, 16), _conv_bn(16, 32, stride=2)),  # 28 → 14
        nn.Sequential(_conv_bn(32, 32), _conv_bn(32, 64, stride=2)),  # 14 → 7
        nn.Sequential(_conv_bn(64, 64), _conv_bn(64, 64)),
    ]
    net = Net(stages, 64, num_classes)
    if weights is not None:
        _load_matching(net, weights)
    return net


def resnet18(num_classes: int, in_chans: int = 1, input_size: int = 28, weights=None) -> Net:
    """torchvision ResNet-18; for inputs under 64 px the stem is 3×3 stride 1 with no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18

    m = tv_resnet18(weights=None)
    if input_size < 64:
        m.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    elif in_chans != 3:
        m.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
    if weights is not None:
        _load_matching(m, weights)
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return Net([stem, m.layer1, m.layer2, m.layer3, m.layer4], 512, num_classes)


def mobilenet_v3_small(
    num_classes: int, in_chans: int = 1, input_size: int = 28, weights=None
) -> Net:
    """torchvision MobileNetV3-Small; for small inputs the first conv keeps full resolution."""
    from torchvision.models import mobilenet_v3_small as tv_mnv3

    m = tv_mnv3(weights=None)
    first = m.features[0][0]
    stride = 1 if input_size < 64 else 2
    m.features[0][0] = nn.Conv2d(in_chans, first.out_channels, 3, stride, 1, bias=False)
    if weights is not None:
        _load_matching(m, weights)
    return Net(list(m.features.children()), 576, num_classes)


MODELS: dict[str, Callable[..., Net]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "mobilenet_v3_small": mobilenet_v3_small,
}


def build_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    input_size: int = 28,
    pretrained: str | Path | None = None,
    seed: int = 0,
) -> Net:
    """Build a registered model; its initial weights depend only on `seed`.

    Args:
        pretrained: a local weights file: a torchvision state_dict for the torchvision models
            (e.g. `resnet18-f37072fd.pth`) or a tlpipe checkpoint. Only the backbone is taken.
            No network access at run time: download the file first (README, "pretrained").
        seed: seeds the initialisation (see `seeded`).
    """
    if name not in MODELS:
        raise TlpipeError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if num_classes < 1:
        raise TlpipeError(f"num_classes must be ≥ 1, got {num_classes}")
    weights = _read_weights(pretrained) if pretrained else None
    with seeded(seed):
        return MODELS[name](num_classes, in_chans=in_chans, input_size=input_size, weights=weights)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Initialise layers from `seed` alone; torch's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise TlpipeError(f"pretrained weights {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file is the user's to fix
        raise TlpipeError(f"cannot read pretrained weights {path}: {e}") from e
    return state.get("state_dict", state)


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load the entries of `state` whose names and shapes match; returns the keys loaded.

    The classifier and a stem of another shape are skipped, except RGB stem kernels, which
    are summed to one channel for grey inputs (the usual timm adaptation).
    """
    ours = module.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in ours or key.startswith(("fc.", "classifier.", "head.")):
            continue
        want = ours[key].shape
        if value.shape == want:
            loaded[key] = value
        elif value.ndim == 4 and value.shape[1] == 3 and want[1] == 1 and _same_kernel(value, want):
            loaded[key] = value.sum(dim=1, keepdim=True)
    if not loaded:
        raise TlpipeError("no pretrained weights match this model; are they for another model?")
    module.load_state_dict(loaded, strict=False)
    return sorted(loaded)


def _same_kernel(value: torch.Tensor, want: torch.Size) -> bool:
    return value.shape[0] == want[0] and value.shape[2:] == want[2:]


def save_checkpoint(path: str | Path, model: Net, meta: dict[str, Any]) -> Path:
    """Write model weights + metadata atomically (a failed save leaves no file)."""
    with atomic_path(path) as tmp:
        torch.save({"meta": dict(meta), "state_dict": model.state_dict()}, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> tuple[Net, dict[str, Any]]:
    """Rebuild a model from `save_checkpoint` output; returns (model in eval mode, meta)."""
    path = Path(path)
    if not path.exists():
        raise TlpipeError(f"model file {path} not found: run the step that trains it first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        meta = ckpt["meta"]
        net = build_model(
            meta["arch"], meta["num_classes"], meta["in_chans"], meta.get("input_size", 28)
        )
        net.load_state_dict(ckpt["state_dict"])
    except TlpipeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TlpipeError(f"{path} is not a readable tlpipe model ({e}); re-run its step") from e
    return net.eval(), meta
