"""Class model visualisation, Simonyan, Vedaldi & Zisserman 2014 ("Deep Inside Convolutional Networks", sec. 2).

For every class c, the image the classifier finds most typical of c:

    I*_c = argmax_I  S_c(I) - l2 * ||I||_2^2

S_c is the unnormalised class score (the logit: maximising the softmax could instead lower the other
classes). I lives in the classifier's normalised input space (the paper's zero-centred image), so the
starting point I = 0 is the mean image: the checkpoint's normalisation mean, in every pixel.
||I||^2 sums over all pixels and channels. All classes are optimised together, one
image per class in one batch (the images do not interact: the model must be in eval mode).

Departures from the paper, all options:
- the ascent uses Adam (step ``lr`` per pixel) instead of plain gradient ascent: the same objective,
  but a step size that does not depend on the scale of a network's gradients;
- ``jitter`` (Mordvintsev et al. 2015): each step scores the image rolled by a random offset of up to
  ``jitter`` pixels, so no pixel-exact high-frequency pattern can pay off;
- ``blur_every`` (Yosinski et al. 2015): every that many steps, a Gaussian blur (``blur_sigma`` px) of I.
Jitter and blur are on by default (maps.class_model): without them the images of a CNN are mostly
high-frequency patterns in which the shapes are hard to see. ``jitter: 0, blur_every: 0`` is the paper's.

Not a per-image map method but a run-once visualisation (``pipeline.maps.visualize``), registered as
``class_model`` and named in ``maps.visualizations``; make_maps runs it once per run and writes
``maps/class_model.png`` (one tile per class) and ``maps/class_model.json`` (per class, S_c of the mean image
and of I*_c).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maps._visualizations import register_visualization
from pipeline.runfolder import save_figure, write_json


@dataclass
class ClassModels:
    images: torch.Tensor  # [C,3,S,S] I*_c in normalised input space
    initial: torch.Tensor  # [C] S_c of the mean image (I = 0)
    final: torch.Tensor  # [C] S_c(I*_c)


def class_scores(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """S_c(I_c) for image c of a [C,3,S,S] batch: the diagonal of the [C,C] logits."""
    return model(images).float().diagonal()


def _jittered(images: torch.Tensor, jitter: int, gen: torch.Generator) -> torch.Tensor:
    if jitter <= 0:
        return images
    dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
    return images.roll((dy, dx), dims=(2, 3))


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel (reflect padding, radius 2 sigma)."""
    radius = max(1, round(2 * sigma))
    t = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1).repeat(3, 1, 1)
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k[:, :, None, :], groups=3)
    return F.conv2d(x, k[:, :, :, None], groups=3)


def class_model_images(model: nn.Module, num_classes: int, *, steps: int = 80, lr: float = 0.05,
                       l2: float = 3e-3, size: int = 128, jitter: int = 8, blur_every: int = 4,
                       blur_sigma: float = 1.0, seed: int = 0) -> ClassModels:
    """Gradient ascent (Adam) on S_c(I) - l2 * ||I||^2 from I = 0 for every class at once; deterministic
    (the jitter offsets come from a generator seeded with ``seed``)."""
    device = next(model.parameters()).device
    images = torch.zeros((num_classes, 3, size, size), device=device, requires_grad=True)
    opt = torch.optim.Adam([images], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        initial = class_scores(model, images)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            objective = class_scores(model, _jittered(images, jitter, gen)) - l2 * images.square().sum((1, 2, 3))
            opt.zero_grad(set_to_none=True)
            (-objective.sum()).backward()
            opt.step()
            if blur_every and step % blur_every == 0:
                with torch.no_grad():
                    images.copy_(_blur(images, blur_sigma))
    images = images.detach()
    with torch.no_grad():
        final = class_scores(model, images)
    return ClassModels(images, initial, final)


def to_uint8(images: torch.Tensor, mean, std, percentile: float = 1.0) -> np.ndarray:
    """[C,3,S,S] normalised -> [C,S,S,3] uint8: de-normalised with ``mean``/``std``, then each image
    stretched so that its ``percentile`` and ``100 - percentile`` percentiles (over all channels,
    keeping the colour balance) span 0..255."""
    x = images.detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    flat = x.flatten(1)
    lo = flat.quantile(percentile / 100, dim=1).view(-1, 1, 1, 1)
    hi = flat.quantile(1 - percentile / 100, dim=1).view(-1, 1, 1, 1)
    x = ((x - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(path: Path, tiles: np.ndarray, titles: list[str], columns: int = 6) -> None:
    """[N,H,W,3] uint8 tiles as one PNG grid, each tile titled (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(tiles) // columns)
    cols = min(columns, len(tiles))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile, title in zip(axes.flat, tiles, titles, strict=False):
        ax.imshow(tile)
        ax.set_title(title, fontsize=10)
    save_figure(path, fig)
    plt.close(fig)


@register_visualization("class_model")
def write_class_models(model: nn.Module, ckpt: dict[str, Any], png: Path, scores_json: Path,
                       size: int | None = None, **options: Any) -> dict[str, dict[str, float]]:
    """:func:`class_model_images` for every class of the checkpoint ``ckpt`` -> ``png`` (a grid, one titled
    tile per class), then ``scores_json`` (per class: S_c of the mean image and of I*_c), and returns the
    latter. ``size`` None = the classifier's input size; ``options``: those of :func:`class_model_images`."""
    classes = ckpt["classes"]
    result = class_model_images(model, len(classes), size=size or ckpt["input_size"], **options)
    save_grid(png, to_uint8(result.images, ckpt["mean"], ckpt["std"]), classes)
    scores = {c: {"initial": round(float(i), 4), "final": round(float(f), 4)}
              for c, i, f in zip(classes, result.initial, result.final, strict=True)}
    write_json(scores_json, scores)
    return scores

