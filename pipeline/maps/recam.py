"""ReCAM, Chen et al. 2022, "Class Re-Activation Maps for Weakly-Supervised Semantic Segmentation".

``recam``: ReLU(sum_k W'_ck f_k), the class maps of a ReCAM classifier's softmax-trained head W'
(``classifier.model: recam``; ``pipeline/models/recam_net.py``), upsampled (bilinear) to the input size
like ``cam``; ``cam`` on a ReCAM net is the BCE head's map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.maps import register_map
from pipeline.maps.cam import requested_upsampled


@register_map("recam")
@torch.no_grad()
def recam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    if not hasattr(model, "recam_maps"):
        raise ConfigError(f"config key 'maps.methods': recam needs a ReCAM classifier (classifier.model: recam), "
                          f"not {type(model).__name__}")
    return requested_upsampled(F.relu(model.recam_maps(model.features(images))), classes, images.shape[-2:])
