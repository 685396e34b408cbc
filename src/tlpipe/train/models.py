"""Model registry: `build_model(name, num_classes, in_chans, input_size, pretrained)` → a `Net`.

Every model is a `Net`: `backbone` maps images to a flat feature vector, `head` is one linear
layer. Transfer strategies only ever touch these two parts (and `blocks()`, the backbone's
stages in input→output order, for partial fine-tuning), so adding a model means adding one
builder to `MODELS`.

Besides our `small_cnn`, `MODELS` holds torchvision classifiers by their torchvision name
(`TORCHVISION`). One adapter per family cuts a torchvision model into stages — a ResNet into
its stem and layer1-4, MobileNet / EfficientNet / ConvNeXt into the children of `features` — and
drops its classifier, keeping the width of its pooled features. Inputs under 64 px get a
stride-1 stem (ResNets: 3×3 and no max-pool, as in CIFAR ResNets), so a 28 px image is not
pooled away before the first stage.

Starting weights (`load_weights`): a local file (a torchvision state_dict or a tlpipe
checkpoint) or torchvision's own weights by name (``imagenet`` = the model's default weights),
read from the torch hub cache. They carry the normalisation they were trained with
(`Weights.normalisation`), which the model keeps in its checkpoint: ImageNet mean/std for
torchvision weights. A stem of another channel count is adapted: RGB kernels are summed for
grey input, normalised with the mean of the three channels' statistics, so a grey image gives
about the activations of the same image in RGB; grey kernels are spread over RGB (divided by
3, exact for grey content).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tlpipe.errors import TlpipeError
from tlpipe.fsio import atomic_path
from tlpipe.train.checkpoint import CheckpointMeta

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet weights were trained on these
IMAGENET_STD = (0.229, 0.224, 0.225)


class Net(nn.Module):
    """A classifier split into `backbone` (features) and `head` (linear).

    Args:
        stages: the backbone's stages, input to output; pooled to `feat_dim` features.
        num_classes: 0 gives a backbone with an empty head (the source model of a scenario
            without a source dataset).
        neck: applied to the pooled (N, feat_dim, 1, 1) features (ConvNeXt's LayerNorm).
    """

    def __init__(
        self,
        stages: list[nn.Module],
        feat_dim: int,
        num_classes: int,
        neck: nn.Module | None = None,
    ):
        super().__init__()
        tail = [nn.AdaptiveAvgPool2d(1), *([neck] if neck is not None else []), nn.Flatten()]
        self.backbone = nn.Sequential(*stages, *tail)
        self.n_blocks = len(stages)
        self.feat_dim = feat_dim
        with warnings.catch_warnings():  # an empty head: "initializing zero-element tensors"
            warnings.simplefilter("ignore", UserWarning)
            self.head = nn.Linear(feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def blocks(self) -> list[nn.Module]:
        """Backbone stages from input to output (the pooling tail excluded)."""
        return list(self.backbone.children())[: self.n_blocks]


# A builder: (num_classes, in_chans, input_size) → (the Net, the torchvision model it was cut
# from, sharing its modules, or None). A torchvision state_dict loads into the second.
Builder = Callable[..., tuple[Net, nn.Module | None]]


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def small_cnn(num_classes: int, in_chans: int = 1, input_size: int = 28) -> tuple[Net, None]:
    """A 4-stage VGG-style CNN sized for 28×28 inputs (about 0.1 M parameters, CPU-friendly)."""
    stages = [
        _conv_bn(in_chans, 16),
        nn.Sequential(_conv_bn(16, 16), _conv_bn(16, 32, stride=2)),  # 28 → 14
        nn.Sequential(_conv_bn(32, 32), _conv_bn(32, 64, stride=2)),  # 14 → 7
        nn.Sequential(_conv_bn(64, 64), _conv_bn(64, 64)),
    ]
    return Net(stages, 64, num_classes), None


# ---------------------------------------------------------------------------- torchvision
#
# A family adapter takes the torchvision model, adapts its stem to (in_chans, small input) and
# returns (stages, neck).

Family = Callable[[nn.Module, int, bool], tuple[list[nn.Module], nn.Module | None]]


def _resnet(m: nn.Module, in_chans: int, small: bool) -> tuple[list[nn.Module], None]:
    """ResNet / ResNeXt: stem (conv1, bn1, relu, maxpool) + layer1-4; small: 3×3 stem, no pool."""
    _adapt_stem(m, "conv1", in_chans, small, small_kernel=3)
    if small:
        m.maxpool = nn.Identity()
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return [stem, m.layer1, m.layer2, m.layer3, m.layer4], None


def _features(m: nn.Module, in_chans: int, small: bool) -> tuple[list[nn.Module], None]:
    """MobileNet / EfficientNet: the children of `features`; small: the 3×3 stem at stride 1."""
    _adapt_stem(m, "features.0.0", in_chans, small)
    return list(m.features.children()), None


def _convnext(m: nn.Module, in_chans: int, small: bool) -> tuple[list[nn.Module], nn.Module]:
    """ConvNeXt: the children of `features` and the classifier's LayerNorm as the neck; small:
    a 3×3 stride-1 stem instead of the 4×4 stride-4 patches."""
    _adapt_stem(m, "features.0.0", in_chans, small, small_kernel=3)
    return list(m.features.children()), m.classifier[0]


TORCHVISION: dict[str, Family] = {  # torchvision name → family adapter
    "resnet18": _resnet,
    "resnet34": _resnet,
    "resnet50": _resnet,
    "resnet101": _resnet,
    "resnext50_32x4d": _resnet,
    "mobilenet_v2": _features,
    "mobilenet_v3_small": _features,
    "mobilenet_v3_large": _features,
    "efficientnet_b0": _features,
    "efficientnet_b1": _features,
    "efficientnet_b2": _features,
    "efficientnet_b3": _features,
    "efficientnet_v2_s": _features,
    "convnext_tiny": _convnext,
    "convnext_small": _convnext,
}


def _adapt_stem(
    m: nn.Module, path: str, in_chans: int, small: bool, small_kernel: int | None = None
) -> None:
    """Replace the first conv for `in_chans` channels and, for small inputs, stride 1."""
    parent_path, _, name = path.rpartition(".")
    parent = m.get_submodule(parent_path)
    old = getattr(parent, name)
    if small:
        k = small_kernel or old.kernel_size[0]
        kernel, stride, padding = k, 1, k // 2
    elif in_chans != old.in_channels:
        kernel, stride, padding = old.kernel_size, old.stride, old.padding
    else:
        return
    bias = old.bias is not None
    setattr(parent, name, nn.Conv2d(in_chans, old.out_channels, kernel, stride, padding, bias=bias))


def _torchvision_builder(name: str, family: Family) -> Builder:
    def build(num_classes: int, in_chans: int = 1, input_size: int = 28):
        from torchvision.models import get_model

        m = get_model(name, weights=None)
        classifier = m.fc if hasattr(m, "fc") else m.classifier
        feat_dim = next(x for x in classifier.modules() if isinstance(x, nn.Linear)).in_features
        stages, neck = family(m, in_chans, input_size < 64)
        return Net(stages, feat_dim, num_classes, neck), m

    build.__doc__ = f"torchvision {name}, cut into stages (see `tlpipe.train.models`)."
    return build


MODELS: dict[str, Builder] = {
    "small_cnn": small_cnn,
    **{name: _torchvision_builder(name, family) for name, family in TORCHVISION.items()},
}


# ---------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Weights:
    """Starting weights and the input normalisation they were trained with.

    Attributes:
        state: The state_dict: torchvision's layout (`conv1.weight`, …) or a tlpipe `Net`'s
            (`backbone.0.0.weight`, …).
        origin: Where they came from (a path, or e.g. ``torchvision resnet18 IMAGENET1K_V1``).
        mean, std: Per-channel normalisation (0-1 scale); None when unknown (a bare state_dict
            of a tlpipe model): the data's own statistics are used then.
    """

    state: dict[str, torch.Tensor]
    origin: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @property
    def tlpipe_layout(self) -> bool:
        return any(k.startswith("backbone.") for k in self.state)

    def normalisation(self, in_chans: int) -> tuple[list[float], list[float]] | None:
        """(mean, std) for `in_chans` input channels (grey: the mean over RGB), or None."""
        if self.mean is None or self.std is None:
            return None
        return _channels(self.mean, in_chans), _channels(self.std, in_chans)


def _channels(values: tuple[float, ...], in_chans: int) -> list[float]:
    if len(values) == in_chans:
        return list(values)
    if in_chans == 1:
        return [sum(values) / len(values)]
    if len(values) == 1:
        return list(values) * in_chans
    raise TlpipeError(f"normalisation for {len(values)} channels cannot serve {in_chans}")


def load_weights(model: str, spec: str | Path) -> Weights:
    """Starting weights for `model` from `spec` (see `tlpipe.params.PretrainConfig.pretrained`).

    An existing file is read as a torchvision state_dict or a tlpipe checkpoint. Otherwise
    `spec` names torchvision weights (``imagenet``, ``DEFAULT``, ``IMAGENET1K_V2``, …), taken
    from the torch hub cache and downloaded there by torchvision when missing.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_file(path)
    word = str(spec).strip()
    if not word.replace("_", "").isalnum():  # a path (has / or .) that does not exist
        raise TlpipeError(f"pretrained weights {path} not found")
    if model not in TORCHVISION:
        raise TlpipeError(
            f"pretrained={spec!r}: {model} has no torchvision weights (and no file {path} "
            f"exists); give a local weights file, or one of: {', '.join(TORCHVISION)}"
        )
    return _torchvision_weights(model, "DEFAULT" if word.lower() == "imagenet" else word)


def _read_file(path: Path) -> Weights:
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol: refused below if unsafe
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file is the user's to fix
        raise TlpipeError(f"cannot read pretrained weights {path}: {_first_line(e)}") from e
    if not isinstance(data, dict):
        raise TlpipeError(f"{path} holds no state_dict (a {type(data).__name__})")
    if isinstance(data.get("meta"), dict) and "state_dict" in data:  # a tlpipe checkpoint
        meta = CheckpointMeta.from_dict(data["meta"], path)
        return Weights(data["state_dict"], str(path), meta.mean, meta.std)
    state = data.get("state_dict", data)
    weights = Weights(state, str(path), IMAGENET_MEAN, IMAGENET_STD)
    # A torchvision state_dict: torchvision's weights are trained on ImageNet-normalised input.
    return weights if not weights.tlpipe_layout else Weights(state, str(path), None, None)


def _torchvision_weights(model: str, name: str) -> Weights:
    """torchvision's weights `name` for `model` through its own loader (torch hub cache)."""
    from urllib.parse import urlparse

    from torchvision.models import get_model_weights

    enum = get_model_weights(model)
    if name.upper() not in enum.__members__:
        choices = ", ".join(enum.__members__)
        raise TlpipeError(f"unknown weights {name!r} for {model}; choose imagenet or {choices}")
    weights = enum[name.upper()]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:  # cached: read from disk; missing: downloaded (checked against the hash in its name)
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except OSError as e:  # no network (URLError), or the cache cannot be written
        raise TlpipeError(
            f"cannot get torchvision's {model} {weights.name} weights ({_first_line(e)}): "
            f"download {weights.url} to {cached}, or set pretrain.pretrained to a local file"
        ) from e
    except Exception as e:  # noqa: BLE001 — a damaged file in the cache, a failed hash check
        raise TlpipeError(
            f"cannot read {cached} ({_first_line(e)}): delete it and download {weights.url} "
            "there again"
        ) from e
    preset = weights.transforms()
    origin = f"torchvision {model} {weights.name}"
    return Weights(state, origin, tuple(preset.mean), tuple(preset.std))


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "reason", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------- building


def build_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    input_size: int = 28,
    pretrained: str | Path | Weights | None = None,
    seed: int = 0,
) -> Net:
    """Build a registered model; its initial weights depend only on `seed`.

    Args:
        num_classes: classes of the head (0: a backbone with an empty head).
        pretrained: starting weights (`Weights`, or a spec for `load_weights`). Only the
            backbone is taken; the stem is adapted to `in_chans` and skipped when its kernel
            differs (the small-input stems).
        seed: seeds the initialisation (see `seeded`).
    """
    if name not in MODELS:
        raise TlpipeError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if num_classes < 0:
        raise TlpipeError(f"num_classes must be ≥ 0, got {num_classes}")
    if pretrained is not None and not isinstance(pretrained, Weights):
        pretrained = load_weights(name, pretrained)
    with seeded(seed):
        net, tv = MODELS[name](num_classes, in_chans=in_chans, input_size=input_size)
    if pretrained is not None:
        if pretrained.tlpipe_layout:
            _load_matching(net, pretrained, name)
        elif tv is None:
            raise TlpipeError(
                f"{pretrained.origin} holds torchvision weights; {name} is not a torchvision "
                "model: choose the model they belong to"
            )
        else:
            _load_matching(tv, pretrained, name)
    return net


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Initialise layers from `seed` alone; torch's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load_matching(module: nn.Module, weights: Weights, model: str) -> list[str]:
    """Load the entries of `weights` whose names and shapes match; returns the keys loaded.

    The head and a stem of another kernel size are skipped; a stem of another channel count
    is adapted (module docstring). Weights that fit less than half of the module's tensors
    are for another model: an error, not a silent half-load.
    """
    ours = {k: v for k, v in module.state_dict().items() if not k.startswith("head.")}
    loaded: dict[str, torch.Tensor] = {}
    for key, value in weights.state.items():
        if key not in ours:
            continue
        want = ours[key].shape
        if value.shape == want:
            loaded[key] = value
        elif value.ndim == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            if want[1] == 1:  # RGB kernels → grey: their sum sees a grey image as RGB would
                loaded[key] = value.sum(dim=1, keepdim=True)
            elif value.shape[1] == 1:  # grey kernels → RGB: spread evenly over the channels
                loaded[key] = value.repeat(1, want[1], 1, 1) / want[1]
    if len(loaded) < len(ours) / 2:
        raise TlpipeError(
            f"{weights.origin}: only {len(loaded)} of {len(ours)} weight tensors fit {model}; "
            "are they for another model?"
        )
    module.load_state_dict(loaded, strict=False)
    return sorted(loaded)


def save_checkpoint(path: str | Path, model: Net, meta: CheckpointMeta) -> Path:
    """Write model weights + metadata atomically (a failed save leaves no file)."""
    with atomic_path(path) as tmp:
        torch.save({"meta": meta.to_dict(), "state_dict": model.state_dict()}, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> tuple[Net, CheckpointMeta]:
    """Rebuild a model from `save_checkpoint` output; returns (model in eval mode, meta)."""
    path = Path(path)
    if not path.exists():
        raise TlpipeError(f"model file {path} not found: run the step that trains it first")
    try:
        with warnings.catch_warnings():  # torch warns on a foreign pickle protocol: refused below
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        meta = CheckpointMeta.from_dict(ckpt.get("meta") if isinstance(ckpt, dict) else None, path)
        net = build_model(meta.arch, meta.num_classes, meta.in_chans, meta.input_size)
        net.load_state_dict(ckpt["state_dict"])
    except TlpipeError:
        raise
    except Exception as e:  # noqa: BLE001 (torch's weights-only message is a page long)
        why = _first_line(e)
        if isinstance(e, pickle.UnpicklingError):
            why = "it holds more than tensors, numbers and strings; loading it could run code"
        raise TlpipeError(f"{path} is not a readable tlpipe model ({why}); re-run its step") from e
    return net.eval(), meta
