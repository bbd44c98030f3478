"""Gradient map methods: every requested (image, class) of a batch, one forward shared by an image's classes.

- ``saliency``: Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional Networks": the
  gradient of the class score w.r.t. the input pixels, max of |grad| over the colour channels.
- ``ig``: Sundararajan et al. 2017, Integrated Gradients: (x - x') * integral of the gradient along
  the straight path from a baseline x' to x (Gauss-Legendre quadrature, ``steps`` nodes).
- ``guided``: Springenberg et al. 2015, Guided Backpropagation: ReLU backward passes only positive
  gradients at positive inputs.
- ``smoothgrad``: Smilkov et al. 2017, SmoothGrad: the average over ``n`` copies of the input with
  Gaussian noise N(0, sigma^2), sigma a fraction of the input's range, of any of the above
  (``base``); the noise is shared by all classes of an image. Modes: ``mean`` (captum's
  ``smoothgrad``), ``abs`` (mean of |attribution|), ``square`` (captum's ``smoothgrad_sq``); options:
  multiply by the input, cap the map at a percentile.

Every method reduces the per-pixel attribution to a map by the max of |.| over the colour channels.
They run in fp32 even inside the caller's autocast: bf16 moves these pixel-level maps by up to 0.2-0.3
(min-max normalised, ResNet-18, against fp32), where the CAM family's maps move by about 0.01 and keep it.

How it is computed, and why it is faster than captum called once per class: the images are grouped by how
many classes they ask for (k); a group's rows (its images, or their noisy copies / IG path points) go
through the model once, then k backward passes through the retained graph give the k classes' gradients.
A peer whose API takes one target per image repeats the forward for every class, so an image with k
classes costs it k forwards and k backwards where it costs one forward and k backwards here (the backward
to the input alone costs about a forward, so 3 classes cost about 4 passes instead of 6). The noise of
SmoothGrad is drawn once per image for all its classes. Guided backprop clamps the gradient with a tensor
hook on each ReLU output rather than a module backward hook, which adds no nodes to the forward graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline.maps._registry import register_map
from pipeline.maps.ops import chunks

# (model, x [R,3,H,W], targets [R,k]) -> attribution [R,k,3,H,W] of each row for each of its k classes
Attribution = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def class_groups(classes: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The images grouped by how many classes they ask for: (image indices [G], their classes [G,k]) per k."""
    counts = classes.sum(1)
    for k in counts.unique().tolist():
        if k > 0:
            images = (counts == k).nonzero().flatten()
            yield images, classes[images].nonzero()[:, 1].view(-1, k)


def grouped_maps(group_maps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                 classes: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] maps from ``group_maps(image indices [G], classes [G,k]) -> [G,k,H,W]``, zero elsewhere."""
    out = torch.zeros((*classes.shape, *images.shape[-2:]), device=images.device)
    for idx, targets in class_groups(classes):
        out[idx[:, None], targets] = group_maps(idx, targets).float()
    return out


def input_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d score[r, targets[r, j]] / d x[r] -> [R,k,3,H,W]: one forward, one backward per slot j (rows are
    independent samples in eval mode, so one backward gives every row's gradient). In fp32 even under the
    caller's autocast (module docstring)."""
    k = targets.shape[1]
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        x = x.detach().float().requires_grad_(True)
        picked = model(x).gather(1, targets)
        grads = [torch.autograd.grad(picked[:, j].sum(), x, retain_graph=j < k - 1)[0] for j in range(k)]
    return torch.stack(grads, 1)


def saliency_attribution(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return input_gradients(model, x, targets)


def ig_attribution(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, steps: int = 16,
                   baseline: str | float = 0.0, chunk: int = 64) -> torch.Tensor:
    """Integrated Gradients with Gauss-Legendre nodes on [0, 1]; ``baseline``: a value or ``mean``."""
    base = x.mean(dim=(2, 3), keepdim=True).expand_as(x) if baseline == "mean" else torch.full_like(x, float(baseline))
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor(0.5 * (nodes + 1), dtype=x.dtype, device=x.device)
    weights = torch.tensor(0.5 * weights, dtype=x.dtype, device=x.device)
    n = x.shape[0]
    total = x.new_zeros((n, targets.shape[1], *x.shape[1:]))
    # rows ordered (step, sample); chunks of at most `chunk` rows bound the memory
    flat_alpha, flat_weight = alphas.repeat_interleave(n), weights.repeat_interleave(n)
    flat_idx = torch.arange(n, device=x.device).repeat(steps)
    for sl in chunks(steps * n, chunk):
        a, i = flat_alpha[sl].view(-1, 1, 1, 1), flat_idx[sl]
        grads = input_gradients(model, base[i] + a * (x[i] - base[i]), targets[i])
        total.index_add_(0, i, grads * flat_weight[sl].view(-1, 1, 1, 1, 1))
    return (x - base)[:, None] * total


@contextlib.contextmanager
def guided_relus(model: nn.Module) -> Iterator[None]:
    """Make every ReLU pass only positive gradients backwards (Guided Backprop), then undo it.

    The gradient reaching each ReLU output is clamped at 0 (a tensor hook), so the ReLU's own backward
    then also zeroes it where the input was negative: clamp(grad_in, 0), as captum's module hook gives."""
    handles, inplace = [], []

    def hook(_m: nn.Module, _i, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(lambda g: g.clamp(min=0))

    for m in model.modules():
        if isinstance(m, nn.ReLU | nn.ReLU6):
            inplace.append((m, m.inplace))
            m.inplace = False  # the hooked output must not be overwritten in place later
            handles.append(m.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, flag in inplace:
            m.inplace = flag


def guided_attribution(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with guided_relus(model):
        return input_gradients(model, x, targets)


ATTRIBUTIONS: dict[str, Attribution] = {"saliency": saliency_attribution, "ig": ig_attribution,
                                        "guided": guided_attribution}


def channel_max(attr: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] -> [..., H, W]: the max of |attribution| over the colour channels."""
    return attr.abs().amax(dim=-3)


def _attribution_maps(fn: Attribution, model: nn.Module, images: torch.Tensor, classes: torch.Tensor,
                      **kw) -> torch.Tensor:
    return grouped_maps(lambda idx, targets: channel_max(fn(model, images[idx], targets, **kw)), images, classes)


@register_map("saliency")
def saliency(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return _attribution_maps(saliency_attribution, model, images, classes)


@register_map("ig")
def ig(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, steps: int = 16,
       baseline: str | float = 0.0, chunk: int = 64) -> torch.Tensor:
    return _attribution_maps(ig_attribution, model, images, classes, steps=steps, baseline=baseline, chunk=chunk)


@register_map("guided")
def guided(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return _attribution_maps(guided_attribution, model, images, classes)


def noisy_copies(images: torch.Tensor, n: int, sigma: float, seed: int) -> torch.Tensor:
    """[B,3,H,W] -> [B,n,3,H,W]: each image plus N(0, (sigma * its range)^2) noise, drawn image-major from a
    generator seeded with ``seed`` (as captum's NoiseTunnel draws it from the global one)."""
    bsz = images.shape[0]
    span = (images.flatten(1).amax(1) - images.flatten(1).amin(1)) * sigma
    gen = torch.Generator(device=images.device).manual_seed(seed)
    std = span.repeat_interleave(n).view(-1, 1, 1, 1).expand(bsz * n, *images.shape[1:]).contiguous()
    noisy = images.repeat_interleave(n, dim=0) + torch.normal(torch.zeros_like(std), std, generator=gen)
    return noisy.view(bsz, n, *images.shape[1:])


def smoothgrad_attribution(fn: Attribution, model: nn.Module, noisy: torch.Tensor, targets: torch.Tensor,
                           mode: str = "abs", chunk: int = 64, **kw) -> torch.Tensor:
    """noisy [G,n,3,H,W] copies of G images, targets [G,k] -> the attribution [G,k,3,H,W] aggregated over
    the copies by ``mode``; ``chunk`` copies per forward."""
    g, n = noisy.shape[:2]
    rows = noisy.flatten(0, 1)
    row_targets = targets.repeat_interleave(n, dim=0)
    row_image = torch.arange(g, device=noisy.device).repeat_interleave(n)
    total = noisy.new_zeros((g, targets.shape[1], *noisy.shape[2:]))
    for sl in chunks(g * n, chunk):
        a = fn(model, rows[sl], row_targets[sl], **kw)
        total.index_add_(0, row_image[sl], a.abs() if mode == "abs" else a * a if mode == "square" else a)
    return total / n


def capped(maps: torch.Tensor, percentile: float) -> torch.Tensor:
    """Each map [..., H, W] capped at its ``percentile`` (100: unchanged)."""
    if percentile >= 100:
        return maps
    cap = torch.quantile(maps.flatten(-2), percentile / 100, dim=-1)
    return torch.minimum(maps, cap[..., None, None])


@register_map("smoothgrad")
def smoothgrad(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, base: str = "saliency",
               n: int = 16, sigma: float = 0.15, mode: str = "abs", times_input: bool = False,
               cap_percentile: float = 100.0, seed: int = 0, chunk: int = 64, **kw) -> torch.Tensor:
    noisy = noisy_copies(images, n, sigma, seed)

    def group_maps(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        agg = smoothgrad_attribution(ATTRIBUTIONS[base], model, noisy[idx], targets, mode=mode, chunk=chunk, **kw)
        if times_input:
            agg = agg * images[idx, None]
        return capped(channel_max(agg).float(), cap_percentile)

    return grouped_maps(group_maps, images, classes)
