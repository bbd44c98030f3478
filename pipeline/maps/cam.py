"""CAM, Zhou et al. 2016: CAM_c = sum_k w_kc f_k from a GAP + bias-free linear head, upsampled.

Needs a model with ``features`` and ``class_maps`` (the GAP + linear head), as ``CAMNet`` has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maps import register_map


@register_map("cam")
@torch.no_grad()
def cam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    maps = F.relu(model.class_maps(model.features(images))).float()
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return maps * classes[:, :, None, None].to(maps.dtype)
