"""ReCAM, Chen et al. 2022 ("Class Re-Activation Maps for Weakly-Supervised Semantic Segmentation").

A CAM network (``CAMNet``: backbone features f [B,K,h,w], GAP, bias-free linear head W trained with the
multi-label BCE) plus a second bias-free linear head W' trained with a softmax cross-entropy on
class-specific features:

    M_c   = ReLU(sum_k W_ck f_k) / max ReLU(...)            the image's max-normalised CAM of class c
    f^c_k = (1/hw) sum_xy M_c(x, y) f_k(x, y)               the features pooled under M_c
    loss  = BCE(GAP(f) W, y) + lambda * CE(f^c W', c)       over every (image, labelled class c) pair
    ReCAM_c = ReLU(sum_k W'_ck f_k)                          the re-activated map

BCE scores each class alone: a class need only find its most discriminative part, and a pixel may score
high for several classes. The softmax over f^c W' asks the features under M_c to be c's and no other
class's, which moves W' (and, through the shared backbone, f) away from the parts that two classes share
and spreads each class's map over more of its object. As in the paper, the first epochs train the CAM alone
(BCE) and the last ``epochs`` add the softmax loss (``classifier.recam.epochs``; the learning rate is then
low, on the tail of the cosine schedule). Both losses from the first step let the softmax loss, far the
larger, decide the features before the CAM localises anything: on MSRC-21 the CAMs fell from 0.54 to 0.30
mIoU and the validation mAP from 0.946 to 0.860.

``forward`` and ``class_maps`` are the BCE head's, as in ``CAMNet``: classification, validation mAP and
``cam``, ``gradcam``, ``scorecam``... use it. The ``recam`` map method (``pipeline/maps/recam.py``) uses
``recam_maps``. ``weight`` (lambda) is a buffer, saved in the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbones import Backbone
from pipeline.models.cam_net import CAMNet, linear_maps, normalised


class ReCAMNet(CAMNet):
    def __init__(self, backbone: Backbone, num_classes: int, weight: float = 1.0, epochs: int | None = None):
        super().__init__(backbone, num_classes)
        self.classifier_re = nn.Linear(backbone.channels, num_classes, bias=False)  # W'
        self.register_buffer("weight", torch.tensor(float(weight)))
        self.epochs = epochs  # the softmax loss joins in the last ``epochs`` epochs (None: in all of them)
        self.re_activating = True

    def set_epoch(self, epoch: int, total: int) -> None:
        """Called by the training loop before each epoch (0-based, of ``total``)."""
        self.re_activating = self.epochs is None or epoch >= total - self.epochs

    def recam_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """W' at every position: [B,K,h,w] -> [B,C,h,w] (before ReLU)."""
        return linear_maps(feats, self.classifier_re.weight)

    def class_features(self, feats: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """f^c [P,K] of the pairs (image b, class c): the features averaged under the image's normalised CAM
        of c (module docstring)."""
        cams = normalised(self.class_maps(feats)[b, c].float())  # [P,h,w]
        return torch.einsum("phw,pkhw->pk", cams, feats[b].float()) / (feats.shape[2] * feats.shape[3])

    def training_losses(self, x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"bce": BCE(S, y), "sce": lambda * CE(f^c W', c)} averaged over the labelled pairs (y > 0.5)."""
        feats = self.features(x)
        bce = F.binary_cross_entropy_with_logits(self.head(feats).float(), targets)
        b, c = (targets > 0.5).nonzero(as_tuple=True)
        if len(b) == 0 or not self.re_activating:  # no labelled pair (background-only images), or CAM epochs
            return {"bce": bce, "sce": self.classifier_re.weight.sum() * 0.0}
        logits = self.classifier_re(self.class_features(feats, b, c))
        return {"bce": bce, "sce": self.weight * F.cross_entropy(logits.float(), c)}
