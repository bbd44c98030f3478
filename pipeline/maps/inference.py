"""Multi-scale + horizontal-flip inference around any map method (as in IRN / AffinityNet).

The image is resized by each scale, run with its mirror image in one batch, the mirrored map flipped
back; the maps of all scales and flips are resized to the image and summed, then each class is
normalised by its maximum over the image so that maps lie in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.device import autocast
from pipeline.maps._registry import MapMethod


def to_tensor(image: np.ndarray, mean, std, device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 RGB -> normalised [1,3,H,W] float tensor on ``device``."""
    x = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def normalise_max(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide each map by its maximum over the image: [..., H, W] -> [0, 1] (an all-zero map stays 0)."""
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return maps / peak.clamp_min(eps)


def multiscale_maps(method: MapMethod, model: nn.Module, image: torch.Tensor, classes: torch.Tensor,
                    scales: list[float], flip: bool = True) -> torch.Tensor:
    """image [1,3,H,W] normalised, classes [1,C] bool -> maps [C,H,W] in [0,1] (zero for other classes)."""
    h, w = image.shape[-2:]
    total = torch.zeros((classes.shape[1], h, w), device=image.device)
    for s in scales:
        size = (max(8, round(h * s)), max(8, round(w * s)))
        x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        with autocast(image.device):
            out = method(model, batch, classes.expand(batch.shape[0], -1)).float()
        if flip:
            out = out[:1] + out[1:].flip(-1)
        total += F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)[0]
    return normalise_max(total)
