"""CAM network, Zhou et al. 2016 ("Learning Deep Features for Discriminative Localization").

backbone features f_k -> global average pooling -> bias-free linear layer: S_c = sum_k w_kc GAP(f_k).
The class activation map is CAM_c = sum_k w_kc f_k, the same linear layer applied at every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbones import Backbone
from pipeline.models.classifier import Classifier


def normalised(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """ReLU, then each map divided by its maximum over the positions: [..., h, w] -> [0, 1]."""
    maps = F.relu(maps)
    return maps / maps.flatten(-2).amax(-1)[..., None, None].clamp_min(eps)


def linear_maps(feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A bias-free linear head [C,K] applied at every position: [B,K,h,w] -> [B,C,h,w]."""
    return torch.einsum("bkhw,ck->bchw", feats, weight.to(feats.dtype))


class CAMNet(Classifier):
    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.use_backbone(backbone)
        self.classifier = nn.Linear(backbone.channels, num_classes, bias=False)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(feats.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def class_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw CAMs at feature resolution: [B,K,h,w] -> [B,C,h,w] (before ReLU)."""
        return linear_maps(feats, self.classifier.weight)
