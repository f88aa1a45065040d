"""Model registry: torchvision backbones by name, with a new classifier head, 1- or 3-channel
input, and weights from ImageNet (torchvision's hub cache), a file, or none."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from edgeft.checkpoint import load_weights_only
from edgeft.config import STEMS
from edgeft.errors import InputError
from edgeft.progress import note as tell

__all__ = [
    "STEMS",
    "Float32IO",
    "ModelInfo",
    "backbone_bn_eval",
    "freeze_backbone",
    "get_model",
    "head_name",
    "imagenet_weights_file",
    "list_models",
    "load_weights_file",
    "model_from_checkpoint",
    "model_info",
]

log = logging.getLogger(__name__)

# Backbones whose stem is the first Conv2d and whose head is the last Linear (torchvision builds
# them all that way), so the same head replacement and channel adaptation work for each.
_MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b1",
)


@dataclass(frozen=True)
class ModelInfo:
    """What `edgeft models` shows for one backbone (numbers from torchvision's weights metadata)."""

    name: str
    params_m: float  # millions of parameters with the 1000-class ImageNet head
    gmacs: float  # multiply-adds (torchvision's "GFLOPS"), in billions, at 224 x 224, 3 channels
    weights: str  # torchvision's default ImageNet weights
    weights_file: Path  # where torchvision looks for them
    cached: bool  # present in the hub cache, so `--weights imagenet` works offline


def list_models() -> list[str]:
    """Names accepted by `get_model`."""
    return list(_MODELS)


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise InputError(f"unknown model {name!r}; choose one of: {', '.join(_MODELS)}")


def imagenet_weights_file(name: str) -> Path:
    """The file torchvision's default ImageNet weights for `name` are cached as."""
    _check_name(name)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def model_info(name: str) -> ModelInfo:
    _check_name(name)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = imagenet_weights_file(name)
    return ModelInfo(
        name=name,
        params_m=weights.meta["num_params"] / 1e6,
        gmacs=weights.meta["_ops"],
        weights=str(weights),
        weights_file=path,
        cached=path.is_file(),
    )


def get_model(
    name: str, *, num_classes: int, in_chans: int = 3, weights: str = "none", stem: str = "torchvision"
) -> nn.Module:
    """Build `name` with a `num_classes` head and `in_chans` input channels.

    weights: "none" (random init), "imagenet" (torchvision's default weights, from the hub cache
    or downloaded), or the path of an edgeft checkpoint or a plain state_dict file (the backbone
    is loaded, the head stays new).
    stem: "torchvision", or "small" for inputs of 64 px or less: a 3x3 stride-1 first convolution
    and no max-pool, so a 32 px image is not shrunk to 8 px before the first block (the small
    stem starts from random weights).
    """
    _check_name(name)
    if num_classes < 2:
        raise InputError(f"a classifier needs at least 2 classes, got {num_classes}")
    if stem not in STEMS:
        raise InputError(f"--stem must be one of {', '.join(STEMS)}, got {stem!r}")
    state_dict = None
    if weights == "imagenet":
        model = _imagenet_model(name)
    else:
        model = torchvision.models.get_model(name, weights=None)
        if weights not in ("none", "", None):
            state_dict = load_weights_file(weights, arch=name)
    _replace_head(model, num_classes)
    _set_in_chans(model, in_chans)
    if stem == "small":
        _small_stem(model)
    if state_dict is not None:
        _load_backbone(model, state_dict, source=str(weights))
    return model


def _small_stem(model: nn.Module) -> None:
    """3x3 stride-1 first convolution (fresh weights) and the stem's max-pool removed."""
    name = _first_conv_name(model)
    conv = model.get_submodule(name)
    model.set_submodule(name, nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None))
    pool = next((n for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)), None)
    if pool is not None and pool.count(".") == name.count("."):  # the stem's own pool, beside the conv
        model.set_submodule(pool, nn.Identity())


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """The model an edgeft checkpoint holds, in eval mode on the CPU."""
    model = get_model(
        checkpoint["arch"],
        num_classes=checkpoint["num_classes"],
        in_chans=checkpoint["in_chans"],
        stem=checkpoint.get("stem", "torchvision"),
    )
    model.load_state_dict({_strip_prefixes(k): v for k, v in checkpoint["state_dict"].items()})
    return model.eval()


def _imagenet_model(name: str) -> nn.Module:
    path = imagenet_weights_file(name)
    if path.is_file():  # torchvision unpickles the cache with weights_only=False: vet it first
        load_weights_only(path)
    try:
        return torchvision.models.get_model(name, weights="DEFAULT")
    except OSError as exc:  # URLError is an OSError: offline and not cached
        raise InputError(
            f"ImageNet weights for {name} are not cached and cannot be downloaded ({exc}); "
            f"put {path.name} in {path.parent}/ (or set TORCH_HOME), or pass --weights PATH"
        ) from None
    except (RuntimeError, KeyError) as exc:  # load_state_dict: the cached file holds other tensors
        raise InputError(
            f"{path} does not hold the ImageNet weights of {name} ({str(exc).strip().splitlines()[0]}); "
            f"replace it with the file from {torchvision.models.get_model_weights(name).DEFAULT.url}"
        ) from None


def load_weights_file(path: str | os.PathLike, *, arch: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in an edgeft checkpoint or a plain state_dict file (weights_only load)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist (use none, imagenet or a file path)")
    content = load_weights_only(path)
    if isinstance(content, dict) and str(content.get("format", "")).startswith("edgeft.checkpoint"):
        if arch is not None and content.get("arch") != arch:
            raise InputError(f"{path} holds a {content.get('arch')} checkpoint, not {arch}")
        content = content["state_dict"]
    elif isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise InputError(f"{path}: neither an edgeft checkpoint nor a state_dict of tensors")
    return {_strip_prefixes(key): value for key, value in content.items()}


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel, torch.compile
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _load_backbone(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Load every backbone tensor of `state_dict`; the head always stays new. A 1-channel stem is
    widened (or a 3-channel one summed) to fit the model. Tensors the model lacks mean another
    architecture, and are refused."""
    own = model.state_dict()
    head = head_name(model) + "."
    stem = _first_conv_name(model) + ".weight"
    foreign = [key for key in state_dict if key not in own]
    if foreign:
        raise InputError(
            f"{source}: {len(foreign)} tensors this model lacks (e.g. {foreign[0]}); weights of another architecture?"
        )
    usable = {}
    new_stem = False
    for key, value in state_dict.items():
        if key.startswith(head):
            continue
        if key == stem and value.shape[2:] != own[key].shape[2:]:
            log.info(
                "%s: stem kernel %s does not fit %s; the stem stays new",
                source,
                tuple(value.shape),
                tuple(own[key].shape),
            )
            new_stem = True
            continue
        if key == stem and value.shape[1] != own[key].shape[1]:
            note = f"{source}: {value.shape[1]}-channel stem adapted to {own[key].shape[1]} channels"
            log.info(note)
            tell(f"edgeft: {note} (kernels summed over the input channels, spread evenly)")
            value = _adapt_stem(value, own[key].shape[1])
        if value.shape != own[key].shape:
            raise InputError(f"{source}: {key} has shape {tuple(value.shape)}, the model needs {tuple(own[key].shape)}")
        usable[key] = value
    missing = [key for key in own if key not in usable and not key.startswith(head) and not (new_stem and key == stem)]
    if missing:
        raise InputError(
            f"{source}: {len(missing)} tensors of this model are missing (e.g. {missing[0]}); "
            "weights of another architecture?"
        )
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s", len(usable), source)


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier head: the model's last Linear layer."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def _first_conv_name(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d))


def _replace_head(model: nn.Module, num_classes: int) -> None:
    name = head_name(model)
    old = model.get_submodule(name)
    if old.out_features != num_classes:
        model.set_submodule(name, nn.Linear(old.in_features, num_classes))


def _set_in_chans(model: nn.Module, in_chans: int) -> None:
    """Adapt the stem to `in_chans`; 1 channel sums the RGB kernels (as timm does)."""
    if in_chans not in (1, 3):
        raise InputError(f"in_chans must be 1 or 3, got {in_chans}")
    name = _first_conv_name(model)
    conv = model.get_submodule(name)
    if conv.in_channels == in_chans:
        return
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(_adapt_stem(conv.weight, in_chans))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(name, new)


def _adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Stem kernels for `in_chans` inputs: summed over the input channels, spread evenly."""
    summed = weight.sum(dim=1, keepdim=True)
    return summed.expand(-1, in_chans, -1, -1) / in_chans


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """Stop (or restart) gradients for everything but the head. BatchNorm statistics of a frozen
    backbone are kept by `backbone_bn_eval`, called after each `model.train()`."""
    head = head_name(model) + "."
    for name, param in model.named_parameters():
        param.requires_grad_(not frozen or name.startswith(head))


def backbone_bn_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics stay as they are."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class Float32IO(nn.Module):
    """Runs a half-precision model behind float32 inputs and outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()
