"""The downstream segmenter: a DeepLabV3 head (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic
Image Segmentation"; torchvision's ASPP) on any backbone of the classifier's registry.

The head is torchvision's: ASPP (a 1x1 branch, three 3x3 atrous branches at ``atrous_rates`` and image
pooling), a 3x3 conv + BN + ReLU, and a 1x1 classifier; only its width is configurable (``channels``;
torchvision fixes 256), so that the 3x3 ASPP branches stay cheap beside the backbone on a CPU. Rates 6/12/18
are the paper's for output stride 16. The head reads the backbone's last stage, without the layers that only
widen it for the classifier (``Backbone.drop_widening``: EfficientNet-Lite0's 320 channels, not the 1280 of its
1x1 ``conv_head``), as DeepLab on MobileNetV2 does. The logits are upsampled bilinearly to the input size. With
``fast_cpu_convs`` the atrous branches leave out their taps that read only padding
(``pipeline.models.convs.AtrousConv2d``: rates 12 and 18 on the 8 x 8 map of a 128-pixel input are 1 x 1
convolutions), exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, UserError, first_line
from pipeline.models.backbones import Backbone, create_backbone, stage_modules
from pipeline.models.convs import exact_faster


class DeepLabV3(nn.Module):
    def __init__(self, backbone: Backbone, num_labels: int, channels: int = 128,
                 atrous_rates: Sequence[int] = (6, 12, 18), frozen_stages: int = 0, fast_cpu_convs: bool = True):
        from torchvision.models.segmentation.deeplabv3 import ASPP

        super().__init__()
        self.backbone = backbone.body
        # the first stages keep their (pretrained) weights and BatchNorm statistics: no gradient, eval mode
        self._frozen = [f"backbone.{name}" for name in stage_modules(backbone, frozen_stages,
                                                                       "segmenter.frozen_stages")]
        for name in self._frozen:
            self.get_submodule(name).requires_grad_(False)
        self.head = nn.Sequential(
            ASPP(backbone.channels, list(atrous_rates), out_channels=channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, num_labels, 1),
        )
        if fast_cpu_convs:
            exact_faster(self.head)
        self.train()

    def train(self, mode: bool = True) -> DeepLabV3:
        super().train(mode)
        for name in self._frozen:
            self.get_submodule(name).eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] -> label logits [B,L,H,W]"""
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_segmenter(backbone: str, pretrained: str, num_labels: int, channels: int,
                    atrous_rates: Sequence[int], output_stride: int | None = None,
                    frozen_stages: int = 0, fast_cpu_convs: bool = True) -> tuple[DeepLabV3, Backbone]:
    """DeepLabV3 on the last stage of ``backbone`` (module docstring); ``fast_cpu_convs``: the convolutions of
    ``pipeline.models.convs`` in the backbone and the head."""
    if frozen_stages and pretrained == "none":
        raise ConfigError(f"config key 'segmenter.frozen_stages': {frozen_stages} stages of a randomly initialised "
                          "backbone would never train (set segmenter.pretrained, or frozen_stages: 0)")
    bb = create_backbone(backbone, pretrained, output_stride, section="segmenter", fast_cpu_convs=fast_cpu_convs)
    bb.drop_widening()
    return DeepLabV3(bb, num_labels, channels, atrous_rates, frozen_stages, fast_cpu_convs), bb


def segmenter_state(net: nn.Module, *, backbone: Backbone, backbone_name: str, classes: list[str],
                    background: bool, channels: int, atrous_rates: Sequence[int], input_size: int,
                    masks: str) -> dict[str, Any]:
    """The checkpoint: weights + what ``load_segmenter`` and ``predict`` need (classes, normalisation, size).
    ``features: last_stage`` marks the head's input (checkpoints without it read the classifier's features)."""
    return {"model": "deeplabv3", "backbone": backbone_name, "output_stride": backbone.stride,
            "classes": list(classes), "background": background,
            "channels": channels, "atrous_rates": list(atrous_rates), "features": "last_stage",
            "mean": list(backbone.mean),
            "std": list(backbone.std), "input_size": input_size, "masks": masks,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def load_segmenter(path: Path, device: torch.device | str = "cpu") -> tuple[DeepLabV3, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: segmenter checkpoint not found (run the train_segmenter stage first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        num_labels = len(ckpt["classes"]) + int(ckpt["background"])
        features = ckpt.get("features", "classifier")  # checkpoints from before the key read the classifier's
        if features == "last_stage":
            net, _ = build_segmenter(ckpt["backbone"], "none", num_labels, ckpt["channels"], ckpt["atrous_rates"],
                                     ckpt["output_stride"])
            net.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in torch.load, a foreign one on its keys
        raise UserError(f"{path}: not a readable segmenter checkpoint ({first_line(exc)}); "
                        "rerun train_segmenter with --force") from None
    if features != "last_stage":  # the removed segmenter.features: classifier
        raise UserError(f"{path}: its head reads the classifier's features ({features}), and segmenters now read "
                        "the backbone's last stage; rerun train_segmenter with --force")
    net.requires_grad_(False)
    return net.to(device).eval(), ckpt
