"""CAM and Grad-CAM: class maps from the activations of one layer, weighted per channel.

- ``cam``: Zhou et al. 2016, "Learning Deep Features for Discriminative Localization": CAM_c = sum_k w_kc f_k
  from a GAP + bias-free linear head, upsampled. Needs a model with ``features`` and ``class_maps`` (the
  GAP + linear head), as ``CAMNet`` has.
- ``gradcam``: Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
  Localization": alpha_k^c = spatial mean of dy_c/dA^k; ReLU(sum_k alpha_k^c A^k). Works on any layer.

How Grad-CAM is computed, and where it saves over the peers called once per class: one forward for the
batch, in which the layers before ``layer`` record no autograd graph (their output becomes a leaf), then
one backward per class slot (the j-th requested class of every image at once) through the layers after
``layer`` only, so an image with k classes costs one forward and k short backwards; only the requested
maps are upsampled to the input size. pytorch-grad-cam repeats the forward and a backward through the
whole network (parameter gradients included) for every class. torchcam, whose k calls can share one
forward, does about the same work, but records the whole network's graph during that forward: more memory
(and a little more time) than here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maps._registry import register_map


def upsampled_pairs(maps: torch.Tensor, b: torch.Tensor, c: torch.Tensor, classes: torch.Tensor,
                    size: torch.Size) -> torch.Tensor:
    """[P,h,w] maps of the pairs (b, c) -> [B,C,*size] (bilinear), zero for the classes not asked for."""
    out = maps.new_zeros((*classes.shape, *size), dtype=torch.float32)
    out[b, c] = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return out


def requested_upsampled(maps: torch.Tensor, classes: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """[B,C,h,w] maps -> [B,C,*size]: the requested classes upsampled (bilinear), zero for the others."""
    b, c = classes.nonzero(as_tuple=True)
    return upsampled_pairs(maps[b, c], b, c, classes, size)


@register_map("cam")
@torch.no_grad()
def cam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return requested_upsampled(F.relu(model.class_maps(model.features(images))), classes, images.shape[-2:])


def layer_activations_and_scores(model: nn.Module, images: torch.Tensor, layer: str) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Run the model; the output of ``layer`` (a submodule name) becomes a leaf that requires grad, and the
    scores keep the graph from it. The layers before it run without autograd: no graph, nothing saved."""
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i, out: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(True)  # record from here on; the no_grad below restores the mode on exit
        captured.append(out.detach().requires_grad_(True))
        return captured[-1]

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            scores = model(images)
    finally:
        handle.remove()
    return captured[0], scores


def padded_classes(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,C] bool -> (targets [B,K], valid [B,K]): each image's requested classes first, in class order,
    padded to K = the most classes an image asks for."""
    k = int(classes.sum(1).max())
    targets = classes.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :k]
    return targets, classes.gather(1, targets)


@register_map("gradcam")
def gradcam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, layer: str = "backbone") -> torch.Tensor:
    """Grad-CAM (module docstring); ``layer`` names any submodule whose output is a [B,K,h,w] map (default:
    the classifier's features)."""
    if not classes.any():
        return images.new_zeros((*classes.shape, *images.shape[-2:]), dtype=torch.float32)
    targets, valid = padded_classes(classes)
    with torch.enable_grad():
        acts, scores = layer_activations_and_scores(model, images, layer)
        picked = scores.gather(1, targets) * valid
        k = targets.shape[1]
        grads = [torch.autograd.grad(picked[:, j].sum(), acts, retain_graph=j < k - 1)[0] for j in range(k)]
    alpha = torch.stack(grads, 1).float().mean(dim=(3, 4))  # [B,K,channels]
    maps = F.relu(torch.einsum("bjk,bkhw->bjhw", alpha, acts.detach().float()))
    b, j = valid.nonzero(as_tuple=True)
    return upsampled_pairs(maps[b, j], b, targets[b, j], classes, images.shape[-2:])
