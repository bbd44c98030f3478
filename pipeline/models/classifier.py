"""The classifier interface: what the training loop, the map methods and the stages use of a classifier.

Every classifier of ``pipeline.models.MODELS`` (``CAMNet``, ``ACoLNet``) is a ``Classifier``, so that the call
sites read its interface instead of probing for attributes:

- ``forward(x)``: class scores [B,C] (the multi-label logits);
- ``features(x)``: the backbone's features [B,K,h,w], and ``class_maps(feats)``: the raw class maps [B,C,h,w];
- ``taps``: the backbone's stage outputs (names of submodules, finest first; AffinityNet reads them) and
  ``channels``, the features' K;
- ``multilabel``: the class probabilities are sigmoids of the scores (Score-CAM's and the faithfulness
  metrics' ``auto`` probability), else a softmax over the classes;
- ``training_losses(x, targets)``: ``{name: loss}``, summed by the training loop and logged per part; the
  default is the multi-label BCE of the scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbones import Backbone


class Classifier(nn.Module):
    multilabel: bool = True  # trained with BCE: class probabilities are sigmoids of the scores
    taps: tuple[str, ...] = ()
    channels: int = 0

    def use_backbone(self, backbone: Backbone) -> None:
        """Take ``backbone``'s body as ``self.backbone``, with its taps and channels."""
        self.backbone = backbone.body
        self.taps = tuple(f"backbone.{name}" for name in backbone.taps)  # stage features (Backbone.taps)
        self.channels = backbone.channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def class_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw class maps at feature resolution: [B,K,h,w] -> [B,C,h,w] (before ReLU)."""
        raise NotImplementedError

    def training_losses(self, x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"bce": BCE(scores, targets)}``; a classifier with several losses returns each by name."""
        return {"bce": F.binary_cross_entropy_with_logits(self(x).float(), targets)}


def is_multilabel(model: nn.Module) -> bool:
    """Whether ``model``'s class probabilities are sigmoids of its scores: a multi-label ``Classifier``. Any
    other module (a map method takes any CNN) is taken as a softmax classifier."""
    return isinstance(model, Classifier) and model.multilabel
