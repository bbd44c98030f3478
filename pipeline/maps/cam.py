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


def layer_activations_and_scores(model: nn.Module, images: torch.Tensor, layer: str) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Run the model; the output of ``layer`` (a submodule name) becomes a leaf that requires grad, so
    gradients w.r.t. it need no gradient through the layers before it (nor trainable parameters)."""
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i, out: torch.Tensor) -> torch.Tensor:
        captured.append(out.detach().requires_grad_(True))
        return captured[-1]

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        scores = model(images)
    finally:
        handle.remove()
    return captured[0], scores


@register_map("gradcam")
def gradcam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, layer: str = "backbone") -> torch.Tensor:
    """Grad-CAM, Selvaraju et al. 2017: alpha_k^c = spatial mean of dy_c/dA^k; ReLU(sum_k alpha_k^c A^k).

    ``layer`` names any submodule whose output is a [B,K,h,w] map (default: the classifier's features).
    One backward per class present in the batch, through the layers after ``layer`` only.
    """
    with torch.enable_grad():
        acts, scores = layer_activations_and_scores(model, images, layer)
        out = torch.zeros((*classes.shape, *acts.shape[-2:]), device=images.device)
        wanted = classes.any(0).nonzero().flatten().tolist()
        for i, c in enumerate(wanted):
            (grad,) = torch.autograd.grad(scores[:, c].sum(), acts, retain_graph=i < len(wanted) - 1)
            alpha = grad.float().mean(dim=(2, 3), keepdim=True)
            out[:, c] = F.relu((alpha * acts.detach().float()).sum(1))
    out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return out * classes[:, :, None, None].to(out.dtype)
