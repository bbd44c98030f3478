"""ACoL, Zhang et al. 2018 ("Adversarial Complementary Learning for Weakly Supervised Object Localization").

Two classifiers on shared backbone features f [B,K,h,w], each a bias-free 1x1 convolution to C class maps
followed by global average pooling (so each is a CAM head, Zhou et al. 2016):

    A_c = sum_k wA_kc f_k                    S^A_c = GAP(A_c)
    E_c = { positions where A_c / max(A_c) >= delta }   (ReLU first; A's most discriminative region of c)
    B_c = sum_k wB_kc (f * 1[not E_c])_k      S^B_c = GAP(B_c)
    loss = BCE(S^A, y) + BCE(S^B, y)          fused map = max(A_c / max A_c, B_c / max B_c)

Erasing E_c from the features fed to B forces B to find the parts of the object that A does not use.
Multi-label: each class has its own erased region, for the image's labelled classes in training, its
predicted classes at inference (sigmoid(S^A) > 0.5, or the top-1 class when none is), the requested
classes in the ``acol`` map method; no position is erased for the other classes. Because B is a 1x1
convolution without bias, B applied to the features erased for class c equals B's map of the unerased
features with E_c set to zero, which is how it is computed: one B pass for all classes. The mask is a
threshold of A's map, not differentiable: no gradient flows through it, and B's loss sends none through
the erased positions.

``forward`` returns A's scores, so classification, validation mAP and the other map methods (``cam`` is
A's map; ``gradcam``, ``scorecam``... explain A) treat an ACoL net as a CAM net. ``delta`` is a buffer,
saved in the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbones import Backbone
from pipeline.models.cam_net import normalised
from pipeline.models.classifier import Classifier


def predicted_classes(scores: torch.Tensor) -> torch.Tensor:
    """[B,C] scores -> [B,C] bool: sigmoid > 0.5, or the top-1 class of an image where no class is."""
    picked = scores > 0
    top1 = F.one_hot(scores.argmax(1), scores.shape[1]).bool()
    return torch.where(picked.any(1, keepdim=True), picked, top1)


class ACoLNet(Classifier):
    def __init__(self, backbone: Backbone, num_classes: int, delta: float = 0.6):
        super().__init__()
        self.use_backbone(backbone)
        self.classifier = nn.Conv2d(backbone.channels, num_classes, 1, bias=False)  # A
        self.classifier_b = nn.Conv2d(backbone.channels, num_classes, 1, bias=False)  # B
        self.register_buffer("delta", torch.tensor(float(delta)))

    def class_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """A's raw class maps at feature resolution: [B,K,h,w] -> [B,C,h,w] (before ReLU)."""
        return self.classifier(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A's class scores S^A = GAP(A)."""
        return self.class_maps(self.features(x)).mean(dim=(2, 3))

    def erased(self, maps_a: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """E [B,C,h,w] bool: where A's normalised map of a chosen class (``classes`` [B,C] bool) is >= delta."""
        return (normalised(maps_a.detach().float()) >= self.delta) & classes[:, :, None, None]

    def class_maps_b(self, feats: torch.Tensor, erased: torch.Tensor) -> torch.Tensor:
        """B's raw class maps [B,C,h,w], class c computed on the features with E_c zeroed (module docstring)."""
        return self.classifier_b(feats).masked_fill(erased, 0.0)

    def branch_maps(self, feats: torch.Tensor,
                    classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps of A and of B, B's input erased for ``classes`` (default: A's predicted classes)."""
        maps_a = self.class_maps(feats)
        if classes is None:
            classes = predicted_classes(maps_a.detach().mean(dim=(2, 3)))
        return maps_a, self.class_maps_b(feats, self.erased(maps_a, classes))

    def fused_maps(self, feats: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """The ACoL localisation map [B,C,h,w] in [0, 1]: max(normalised A, normalised B)."""
        maps_a, maps_b = self.branch_maps(feats, classes)
        return torch.maximum(normalised(maps_a.float()), normalised(maps_b.float()))

    def training_losses(self, x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"a": BCE(S^A, y), "b": BCE(S^B, y)}, B's input erased for the labelled classes (y > 0.5)."""
        maps_a, maps_b = self.branch_maps(self.features(x), targets > 0.5)
        return {name: F.binary_cross_entropy_with_logits(m.mean(dim=(2, 3)).float(), targets)
                for name, m in (("a", maps_a), ("b", maps_b))}
