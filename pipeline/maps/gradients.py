"""Gradient map methods: all requested (image, class) pairs of a batch in one forward/backward.

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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline.maps import register_map

Attribution = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x [N,3,H,W], t [N])


def pairs(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image index, class index) pairs asked for by a [B,C] bool mask, image-major."""
    b, c = classes.nonzero(as_tuple=True)
    return b, c


def scatter_maps(values: torch.Tensor, b: torch.Tensor, c: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """[N,H,W] maps of the pairs -> [B,C,H,W], zero for the classes not asked for."""
    out = values.new_zeros((*classes.shape, *values.shape[-2:]))
    out[b, c] = values
    return out


def input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d score[n, targets[n]] / d x[n] for every row n (rows are independent samples in eval mode)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        scores = model(x)
        (grad,) = torch.autograd.grad(scores.gather(1, targets[:, None]).sum(), x)
    return grad


def saliency_attribution(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return input_gradient(model, x, targets)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, max(1, size)):
        yield slice(start, min(n, start + max(1, size)))


def ig_attribution(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, steps: int = 16,
                   baseline: str | float = 0.0, chunk: int = 64) -> torch.Tensor:
    """Integrated Gradients with Gauss-Legendre nodes on [0, 1]; ``baseline``: a value or ``mean``."""
    base = x.mean(dim=(2, 3), keepdim=True).expand_as(x) if baseline == "mean" else torch.full_like(x, float(baseline))
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor(0.5 * (nodes + 1), dtype=x.dtype, device=x.device)
    weights = torch.tensor(0.5 * weights, dtype=x.dtype, device=x.device)
    total = torch.zeros_like(x)
    n = x.shape[0]
    # rows ordered (step, sample); chunks of at most `chunk` rows bound the memory
    flat_alpha = alphas.repeat_interleave(n)
    flat_idx = torch.arange(n, device=x.device).repeat(steps)
    for sl in _chunks(steps * n, chunk):
        a, i = flat_alpha[sl].view(-1, 1, 1, 1), flat_idx[sl]
        grads = input_gradient(model, base[i] + a * (x[i] - base[i]), targets[i])
        w = weights[torch.div(torch.arange(sl.start, sl.stop, device=x.device), n, rounding_mode="floor")]
        total.index_add_(0, i, grads * w.view(-1, 1, 1, 1))
    return (x - base) * total


@contextlib.contextmanager
def guided_relus(model: nn.Module) -> Iterator[None]:
    """Make every ReLU pass only positive gradients backwards (Guided Backprop), then undo it."""
    handles, inplace = [], []
    for m in model.modules():
        if isinstance(m, nn.ReLU | nn.ReLU6):
            inplace.append((m, m.inplace))
            m.inplace = False
            handles.append(m.register_full_backward_hook(lambda _m, gin, _gout: (gin[0].clamp(min=0),)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, flag in inplace:
            m.inplace = flag


def guided_attribution(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with guided_relus(model):
        return input_gradient(model, x, targets)


ATTRIBUTIONS: dict[str, Attribution] = {"saliency": saliency_attribution, "ig": ig_attribution,
                                        "guided": guided_attribution}


def channel_max(attr: torch.Tensor) -> torch.Tensor:
    return attr.abs().amax(dim=1)


def _attribute_pairs(fn: Attribution, model: nn.Module, images: torch.Tensor, classes: torch.Tensor,
                     **kw) -> torch.Tensor:
    b, c = pairs(classes)
    if b.numel() == 0:
        return torch.zeros((*classes.shape, *images.shape[-2:]), device=images.device)
    return scatter_maps(channel_max(fn(model, images[b], c, **kw)).float(), b, c, classes)


@register_map("saliency")
def saliency(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return _attribute_pairs(saliency_attribution, model, images, classes)


@register_map("ig")
def ig(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, steps: int = 16,
       baseline: str | float = 0.0, chunk: int = 64) -> torch.Tensor:
    return _attribute_pairs(ig_attribution, model, images, classes, steps=steps, baseline=baseline, chunk=chunk)


@register_map("guided")
def guided(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return _attribute_pairs(guided_attribution, model, images, classes)


def smoothgrad_attribution(fn: Attribution, model: nn.Module, images: torch.Tensor, classes: torch.Tensor,
                           n: int = 16, sigma: float = 0.15, mode: str = "abs", seed: int = 0,
                           chunk: int = 64, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (aggregated attribution [N,3,H,W] of the pairs, pair images, pair classes)."""
    bsz = images.shape[0]
    span = (images.flatten(1).amax(1) - images.flatten(1).amin(1)) * sigma  # sigma: fraction of the range
    gen = torch.Generator(device=images.device).manual_seed(seed)
    std = span.repeat_interleave(n).view(-1, 1, 1, 1).expand(bsz * n, *images.shape[1:]).contiguous()
    noisy = images.repeat_interleave(n, dim=0) + torch.normal(torch.zeros_like(std), std, generator=gen)
    b, c = pairs(classes)
    # rows (pair, copy): pair p uses the noisy copies of its image b[p]
    rows = (b[:, None] * n + torch.arange(n, device=images.device)).reshape(-1)
    targets = c.repeat_interleave(n)
    attrs = []
    for sl in _chunks(rows.numel(), chunk):
        a = fn(model, noisy[rows[sl]], targets[sl], **kw)
        attrs.append(a.abs() if mode == "abs" else a * a if mode == "square" else a)
    agg = torch.cat(attrs).view(b.numel(), n, *images.shape[1:]).mean(1)
    return agg, b, c


@register_map("smoothgrad")
def smoothgrad(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, base: str = "saliency",
               n: int = 16, sigma: float = 0.15, mode: str = "abs", times_input: bool = False,
               cap_percentile: float = 100.0, seed: int = 0, chunk: int = 64, **kw) -> torch.Tensor:
    if classes.sum() == 0:
        return torch.zeros((*classes.shape, *images.shape[-2:]), device=images.device)
    agg, b, c = smoothgrad_attribution(ATTRIBUTIONS[base], model, images, classes, n=n, sigma=sigma, mode=mode,
                                       seed=seed, chunk=chunk, **kw)
    if times_input:
        agg = agg * images[b]
    maps = channel_max(agg).float()
    if cap_percentile < 100:
        cap = torch.quantile(maps.flatten(1), cap_percentile / 100, dim=1)
        maps = torch.minimum(maps, cap[:, None, None])
    return scatter_maps(maps, b, c, classes)
