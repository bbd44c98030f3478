"""ACoL, Zhang et al. 2018, "Adversarial Complementary Learning for Weakly Supervised Object Localization".

``acol``: the fused localisation map of an ACoL classifier (``classifier.model: acol``), for each requested
class c: max(A_c / max A_c, B_c / max B_c) after ReLU, where B's features are erased where A's normalised
map of c is >= delta (the delta it was trained with; ``pipeline/models/acol_net.py``). The requested classes
are the ones erased for; in ``make_maps`` they are the image's labels, as in training. Upsampled
(bilinear) to the input size, like ``cam``; ``cam`` on an ACoL net is branch A's map alone.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.maps._registry import register_map
from pipeline.maps.cam import requested_upsampled
from pipeline.models.acol_net import ACoLNet


@register_map("acol")
@torch.no_grad()
def acol(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    if not isinstance(model, ACoLNet):
        raise ConfigError(f"config key 'maps.methods': acol needs an ACoL classifier (classifier.model: acol), "
                          f"not {type(model).__name__}")
    return requested_upsampled(model.fused_maps(model.features(images), classes), classes, images.shape[-2:])
