"""Score-CAM and SS-CAM: channel maps weighted by how much each one, used as a mask on the input, raises
the class confidence. Gradient-free: forward passes only.

- ``scorecam``: Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
  Networks" (CVPR workshops, arXiv:1910.01279). With A^k (k = 1..K) the activations of ``layer``, U the
  bilinear upsampling to the input size and s the min-max normalisation to [0, 1]::

      H^k   = s(U(A^k))
      M^k   = X * H^k + X_b * (1 - H^k)           the input where the channel fires, the baseline elsewhere
      a_k^c = p_c(M^k) - p_c(X_b)                 the channel's Increase of Confidence
      L^c   = U(ReLU(sum_k a_k^c A^k))

  p is the model's class probability: sigmoid for a multi-label classifier (a ``pipeline.models.Classifier``
  with ``multilabel = True``, as ``CAMNet``, trained with BCE), softmax over the classes otherwise.

- ``sscam``: Wang, Naidu et al. 2020, "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization"
  (arXiv:2006.14255): the confidence is averaged over ``n`` noisy samples, noise d_i ~ N(0, sigma^2) per
  pixel::

      a_k^c = (1/n) sum_i p_c(M^k_i) - p_c(X_b)
      variant "activation" (the paper's first): M^k_i = X * (H^k + d_i) + X_b * (1 - H^k - d_i),
                                                 sigma in mask units (H^k spans [0, 1])
      variant "input" (the paper's second):      M^k_i = M^k + d_i, sigma a fraction of the image's range

Options: ``layer`` (a submodule whose output is [B,K,h,w]; default ``backbone``, the classifier's
features), ``baseline`` (X_b: a value in normalised input units, or ``mean``, the image's mean colour),
``probability`` (``auto`` | ``sigmoid`` | ``softmax`` | ``logit``, the raw class scores), ``chunk`` (masked
inputs per forward), ``stem`` (``auto`` | ``basis`` | ``conv``: below); SS-CAM adds ``variant``, ``n``,
``sigma`` and ``seed``.

How it is computed: an image's masked inputs are forwarded once for all of its requested classes (one pass
gives p for every class; SS-CAM's noise is shared by the classes too), ``chunk`` at a time, built on the fly
(never K x 3 x H x W at once), through a copy of the model in channels_last memory format with its BatchNorms
folded into the convolutions (``pipeline.models.fold``, faster forwards on CPU; made once per model and reused
while the model is unchanged; on an inference copy, such as make_maps', that copy itself). Score-CAM computes
the model's first convolution of the masked inputs from a per-image basis where that is cheaper
(``pipeline.maps.stem_basis``: a ResNet's 7 x 7 stem with a small ``layer``; ``stem: auto``), exactly, since
H^k is affine in A^k and the convolution linear; the baseline's forward is shared by all images when X_b is a
constant; images with no requested class are not forwarded. A channel whose activation is constant over the
map (e.g. all zero after a ReLU) is skipped with a_k^c = 0: its H^k is 0/0, undefined (the authors' code skips
it too; taking H^k = 0 would give M^k = X_b, the same a_k^c = 0). Channels of an image with the same
normalised map s(A^k) (e.g. one active position of a small map) share one masked input, so their forwards, and
in SS-CAM their noise.

Differences from the peers: torchcam's ScoreCAM and SSCAM weight with a softmax over the channels of
logit differences, softmax_k(f_c(M^k) - f_c(X)), pytorch-grad-cam's ScoreCAM with softmax_k(f_c(X * H^k));
here a_k^c stays the Increase of Confidence of the paper's definition (``probability="logit"`` gives the
peers' a_k^c before their softmax), so channels that lower the confidence weigh negatively. torchcam
min-max normalises A^k before upsampling it, pytorch-grad-cam upsamples with ``align_corners=True``; both
divide by (max - min + 1e-8) instead of skipping constant channels, so such a channel masks the whole input
out, and both score one class per call. torchcam's SSCAM is the ``activation`` variant (default sigma 2,
n 35) with noise from the global RNG; the SS-CAM authors' code weights by the softmax probability without a
baseline term and scales sigma by 1 / the range of the unnormalised map. Neither peer has the ``input``
variant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maps._registry import register_map
from pipeline.maps.cam import upsampled_pairs
from pipeline.maps.ops import chunks, upsampled_channels
from pipeline.maps.stem_basis import StemBasis
from pipeline.models.classifier import is_multilabel
from pipeline.models.fold import inference_copy

Probability = Literal["auto", "sigmoid", "softmax", "logit"]
Variant = Literal["activation", "input"]
Stem = Literal["auto", "basis", "conv"]

PROBABILITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "softmax": lambda scores: scores.softmax(1),
    "logit": lambda scores: scores,
}


def probability_fn(model: nn.Module, probability: Probability) -> Callable[[torch.Tensor], torch.Tensor]:
    """Class scores [N,C] -> p [N,C]; ``auto``: sigmoid if the model is multi-label, else softmax."""
    if probability == "auto":
        probability = "sigmoid" if is_multilabel(model) else "softmax"
    if probability not in PROBABILITIES:
        raise ValueError(f"probability: expected auto or one of {', '.join(PROBABILITIES)}, got {probability!r}")
    return lambda scores: PROBABILITIES[probability](scores.float())


def layer_activations(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    """The output [B,K,h,w] of the submodule ``layer`` for ``images`` (one forward of the model)."""
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(images)
    finally:
        handle.remove()
    return captured[0].float()


def baseline_images(images: torch.Tensor, baseline: float | str) -> torch.Tensor:
    """X_b: [1,3,H,W] filled with a constant, or [B,3,H,W] of each image's mean colour (``mean``)."""
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if isinstance(baseline, str):
        raise ValueError(f"baseline: expected a number or 'mean', got {baseline!r}")
    return torch.full_like(images[:1], float(baseline))


def scored_channels(acts: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (image, channel) pairs to score, image-major, and for each the pair whose masked input it shares.

    Pairs are those of the images with a requested class and of the channels whose activation is not constant
    over the map. Channels of an image with the same normalised map s(A^k) have the same H^k = s(U(A^k))
    (U is linear), hence the same a_k^c: the first of them is forwarded for all (-> index of that pair).
    """
    flat = acts.flatten(2)
    lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    b, k = ((hi > lo)[..., 0] & classes.any(1, keepdim=True)).nonzero(as_tuple=True)
    normalised = (flat[b, k] - lo[b, k]) / (hi[b, k] - lo[b, k])
    _, group = torch.unique(torch.cat([b[:, None].to(normalised.dtype), normalised], 1), dim=0, return_inverse=True)
    index = torch.arange(b.numel(), device=b.device)
    first = index.new_full((b.numel(),), b.numel()).scatter_reduce_(0, group, index, "amin")
    return b, k, first[group]


def channel_masks(acts: torch.Tensor, b: torch.Tensor, k: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """H = s(U(A[b, k])): channels upsampled to ``size``, min-max normalised to [0, 1] -> [R,1,H,W]."""
    up, lo, span = upsampled_channels(acts, b, k, size)
    return (up - lo) / span


@torch.no_grad()
def increase_of_confidence(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, layer: str = "backbone",
                           baseline: float | str = 0.0, probability: Probability = "auto", chunk: int = 64,
                           variant: Variant = "activation", n: int = 1, sigma: float = 0.0,
                           seed: int = 0, stem: Stem = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (A [B,K,h,w], a [B,C,K]): a_k^c = (1/n) sum_i p_c(M^k_i) - p_c(X_b) for every class of the images
    with a requested class (the same forwards serve them all), 0 for skipped channels and other images.

    ``n`` = 1 and ``sigma`` = 0 is Score-CAM; otherwise SS-CAM's ``variant`` (module docstring). The rows
    (image, channel, sample) of the channels forwarded (``scored_channels``) go ``chunk`` at a time, in that
    order, each chunk's noise drawn from one generator seeded with ``seed``. ``stem``: how Score-CAM's masked
    forwards start (``pipeline.maps.stem_basis``): ``basis`` (the first convolution from a per-image basis;
    an error where that does not apply), ``conv`` (as they are), ``auto`` (``basis`` where it applies and is
    cheaper).
    """
    if variant not in ("activation", "input"):
        raise ValueError(f"variant: expected activation or input, got {variant!r}")
    if stem not in ("auto", "basis", "conv"):
        raise ValueError(f"stem: expected auto, basis or conv, got {stem!r}")
    prob = probability_fn(model, probability)
    acts = layer_activations(model, images, layer)
    fast = inference_copy(model, images[:1])  # BatchNorm folded, channels_last
    forward = lambda x: fast(x.contiguous(memory_format=torch.channels_last))  # noqa: E731
    x_b = baseline_images(images, baseline)
    p_b = prob(forward(x_b)).expand(images.shape[0], -1)
    x_b = x_b.expand_as(images)
    b, k, shared = scored_channels(acts, classes)
    span = (images.flatten(1).amax(1) - images.flatten(1).amin(1)) * sigma  # noise std of the input variant
    gen = torch.Generator(device=images.device).manual_seed(seed)

    def masked_inputs(rb: torch.Tensor, rk: torch.Tensor) -> torch.Tensor:
        masks = channel_masks(acts, rb, rk, images.shape[-2:])
        if variant == "activation" and sigma > 0:
            masks = masks + sigma * torch.randn(masks.shape, generator=gen, device=masks.device)
        x = x_b[rb] + masks.to(images.dtype) * (images[rb] - x_b[rb])  # X * H + X_b * (1 - H)
        if variant == "input" and sigma > 0:
            x = x + span[rb, None, None, None] * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return x

    basis = None
    if stem != "conv" and sigma == 0 and b.numel():
        basis = StemBasis.build(fast, images, x_b, acts, masked_inputs, only_if_cheaper=stem == "auto")
    if stem == "basis" and b.numel() and basis is None:
        raise ValueError("stem: basis needs Score-CAM (sigma 0) on a model whose first layer is a convolution "
                         "of its input")
    scores = basis or (lambda rb, rk: forward(masked_inputs(rb, rk)))
    rows = shared.unique().repeat_interleave(n)  # rows (pair, sample) of the pairs forwarded, in pair order
    total = p_b.new_zeros((b.numel(), p_b.shape[1]))
    for sl in chunks(rows.numel(), chunk):
        total.index_add_(0, rows[sl], prob(scores(b[rows[sl]], k[rows[sl]])))
    alpha = p_b.new_zeros((*acts.shape[:2], p_b.shape[1]))
    alpha[b, k] = total[shared] / n - p_b[b]
    return acts, alpha.transpose(1, 2)


def weighted_maps(acts: torch.Tensor, alpha: torch.Tensor, classes: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """L^c = U(ReLU(sum_k a_k^c A^k)) for the requested classes only, zero for the others -> [B,C,H,W]."""
    b, c = classes.nonzero(as_tuple=True)
    maps = F.relu(torch.einsum("pk,pkhw->phw", alpha[b, c], acts[b]))
    return upsampled_pairs(maps, b, c, classes, size)


@register_map("scorecam")
def scorecam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, layer: str = "backbone",
             baseline: float | str = 0.0, probability: Probability = "auto", chunk: int = 64,
             stem: Stem = "auto") -> torch.Tensor:
    """Score-CAM (module docstring): one set of K masked forwards per image, shared by its classes."""
    acts, alpha = increase_of_confidence(model, images, classes, layer, baseline, probability, chunk, stem=stem)
    return weighted_maps(acts, alpha, classes, images.shape[-2:])


@register_map("sscam")
def sscam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, layer: str = "backbone",
          baseline: float | str = 0.0, probability: Probability = "auto", chunk: int = 64,
          variant: Variant = "activation", n: int = 8, sigma: float = 0.2, seed: int = 0,
          stem: Stem = "auto") -> torch.Tensor:
    """SS-CAM (module docstring): Score-CAM with the confidences averaged over ``n`` noisy samples."""
    acts, alpha = increase_of_confidence(model, images, classes, layer, baseline, probability, chunk,
                                         variant=variant, n=n, sigma=sigma, seed=seed, stem=stem)
    return weighted_maps(acts, alpha, classes, images.shape[-2:])
