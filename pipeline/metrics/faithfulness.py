"""Faithfulness of class maps: does the classifier's own confidence follow what a map points at?

For every (image, class) pair scored (an image's image-level classes, the classes its maps were made for),
with p the classifier's class probability (sigmoid of the score for a multi-label net such as ``CAMNet``,
softmax otherwise: the choice Score-CAM makes, ``pipeline.maps.scorecam.probability_fn``), x the image in
pixel space [0, 1] (normalised with the classifier's mean/std only just before the forward) and M the
class's map in [0, 1]:

- **Average Drop** and **Increase in Confidence** (Chattopadhay et al. 2018, Grad-CAM++; the protocol of
  Score-CAM, Wang et al. 2020, Sec. 4.2, and SS-CAM): Y = p_c(x), O = p_c(x * M), the image multiplied by
  its map, so that what the map leaves out turns black. Average Drop = mean of max(0, Y - O) / Y x 100
  (lower is better), Increase in Confidence = the % of pairs with O > Y (higher is better).
- **Deletion** and **Insertion** (Petsiuk et al. 2018, RISE; Score-CAM Sec. 4.3): the pixels ordered by
  decreasing map value (ties in a fixed pseudo-random order, seed 0, so a flat map removes pixels at
  random rather than row by row), ``steps`` equal steps. Deletion: the first n_i = round(i N / steps)
  pixels set to the deletion base (default black, RISE's zero substrate), from the image (i = 0) to the
  all-base image (i = steps). Insertion: start from the insertion base (default the image blurred with a
  Gaussian of std ``blur_sigma`` x the image's shorter side, RISE's blurred substrate) and put the first
  n_i pixels of the image back, up to the image itself. Each curve is p_c against the fraction of pixels
  n_i / N; its AUC is the trapezoid rule over [0, 1]. Deletion AUC: lower is better; insertion AUC:
  higher is better.
- **Energy-based pointing game** (Score-CAM Sec. 4.3, with the class's GT mask in place of its bounding
  box): sum of M over the class's GT pixels / sum of M over the image, both sums leaving out the void
  (255) pixels of the GT. A map with no energy scores 0; a class with no GT pixel in the mask is left out.

Cost per image: three forwards shared by its classes and methods (the image, the deletion and the
insertion bases, the curves' end points), then per (method, class) one for O and 2 (steps - 1) for the
curves' inner points, ``batch`` images per forward (on CPU at most ``CPU_PIXELS`` pixels), built on the
fly (bounded memory), through a BatchNorm-folded channels_last copy of the classifier (``pipeline.models.fold``).

The evaluate stage's side (the cache ``faithfulness.json``, the curves' plot, the log) is ``stages/faithfulness.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.data import IGNORE, read_image
from pipeline.device import autocast
from pipeline.errors import DataError
from pipeline.maps.io import load_maps
from pipeline.maps.scorecam import probability_fn
from pipeline.models.fold import inference_copy

Base = Literal["black", "blur"]
# On CPU a forward takes at most this many pixels (16 images of 128 x 128, 3 of 320 x 213): larger batches are
# no faster there, and their large temporaries cost as much system time (page faults) as the forwards themselves.
CPU_PIXELS = 2**18
KEYS = ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "energy_pointing_game")


# --------------------------------------------------------------------------------------------- the scores


def average_drop(y: np.ndarray, o: np.ndarray) -> float:
    """Mean of max(0, Y - O) / Y over the pairs, in % (Y: p on the image, O: p on the image times its map)."""
    y, o = np.asarray(y, np.float64), np.asarray(o, np.float64)
    return float(np.mean(np.maximum(0.0, y - o) / np.maximum(y, np.finfo(np.float64).tiny)) * 100.0)


def increase_in_confidence(y: np.ndarray, o: np.ndarray) -> float:
    """The % of pairs whose confidence rises when the image is multiplied by its map (O > Y)."""
    return float(np.mean(np.asarray(o) > np.asarray(y)) * 100.0)


def auc(curve: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Trapezoid-rule area under curve(s) [..., S+1] sampled at ``fractions`` [S+1] (0 to 1)."""
    curve, x = np.asarray(curve, np.float64), np.asarray(fractions, np.float64)
    return ((curve[..., 1:] + curve[..., :-1]) * 0.5 * np.diff(x)).sum(-1)


def energy_pointing_game(maps: np.ndarray, gt: np.ndarray, labels: Iterable[int]) -> np.ndarray:
    """Share of each map's energy inside its class's GT mask: maps [K,H,W] >= 0, gt [H,W] label indices,
    ``labels`` the K classes' label indices -> [K]; void (255) pixels left out of both sums. A map with
    no energy scores 0; a class without any GT pixel is NaN (left out of the mean)."""
    labels = np.asarray(list(labels))
    valid = gt != IGNORE
    m = np.asarray(maps, np.float64) * valid
    inside = gt[None] == labels[:, None, None]
    total = m.sum((1, 2))
    out = np.divide((m * inside).sum((1, 2)), total, out=np.zeros_like(total), where=total > 0)
    return np.where(inside.any((1, 2)), out, np.nan)


# ------------------------------------------------------------------------------------- the perturbations


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """[3,H,W] blurred by a separable Gaussian of std ``sigma`` pixels (edges replicated); sigma 0 = as is."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=image.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(image.dtype)
    x = image[None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(3, 1, 1, -1),
                 groups=3)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(3, 1, -1, 1),
                 groups=3)
    return x[0]


def base_image(image: torch.Tensor, kind: Base, blur_sigma: float) -> torch.Tensor:
    """The substrate pixels are removed to (deletion) or revealed from (insertion): black, or the image
    blurred with std ``blur_sigma`` x its shorter side."""
    if kind == "black":
        return torch.zeros_like(image)
    if kind == "blur":
        return gaussian_blur(image, blur_sigma * min(image.shape[-2:]))
    raise ValueError(f"base: expected black or blur, got {kind!r}")


def pixel_ranks(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[K,H,W] -> [K,H*W]: each pixel's place when ordered by decreasing map value, ties in a fixed
    pseudo-random order (seeded), the same for every map of the image."""
    k, n = maps.shape[0], maps[0].numel()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(maps.device)
    order = perm[torch.argsort(-maps.reshape(k, n)[:, perm].float(), dim=1, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=maps.device).expand(k, n))
    return ranks


def step_counts(n_pixels: int, steps: int) -> np.ndarray:
    """Pixels removed / inserted at each of the steps + 1 points: round(i N / steps), i = 0..steps."""
    return np.array([round(i * n_pixels / steps) for i in range(steps + 1)], dtype=np.int64)


# ------------------------------------------------------------------------------------------- per image


@dataclass
class ImageScores:
    """One image's pairs: y, o [K]; deletion, insertion [K, steps+1] (p against ``fractions``)."""

    y: np.ndarray
    o: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    fractions: np.ndarray


class Probe:
    """The classifier wrapped for the faithfulness forwards: pixel-space [R,3,H,W] in [0,1] -> p [R,C].

    ``model`` returns class scores [R,C]; ``probability`` turns them into p (default: the model's own,
    sigmoid when ``model.multilabel``, else softmax). ``fast`` forwards through a BatchNorm-folded
    channels_last copy (``pipeline.models.fold.inference_copy``, checked against the model on a probe).
    """

    def __init__(self, model: nn.Module, mean, std, steps: int = 16, batch: int = 32, deletion_base: Base = "black",
                 insertion_base: Base = "blur", blur_sigma: float = 0.05,
                 probability: Callable[[torch.Tensor], torch.Tensor] | None = None, fast: bool = False):
        if steps < 1 or batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
        if probability is None:
            probability = probability_fn(model, "auto")
        self.model, self.prob, self.fast = model, probability, fast
        self.steps, self.batch = steps, batch
        self.deletion_base, self.insertion_base, self.blur_sigma = deletion_base, insertion_base, blur_sigma
        self.device = next(iter(model.parameters()), torch.empty(0)).device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._forward: nn.Module | None = None if fast else model

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std
        if self._forward is None:
            self._forward = inference_copy(self.model, x[:1])
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            return self.prob(self._forward(x)).float()

    def bases(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (base_image(image, self.deletion_base, self.blur_sigma),
                base_image(image, self.insertion_base, self.blur_sigma))

    @torch.no_grad()
    def reference(self, image: torch.Tensor) -> torch.Tensor:
        """p [3,C] of the image, the all-deleted image and the insertion start: every curve's end points."""
        return self(torch.stack([image, *self.bases(image)]))

    @torch.no_grad()
    def scores(self, image: torch.Tensor, maps: torch.Tensor, classes: list[int],
               reference: torch.Tensor | None = None) -> ImageScores:
        """image [3,H,W] pixels in [0,1], maps [K,H,W] in [0,1] of ``classes`` (K class indices)."""
        image, maps = image.to(self.device).float(), maps.to(self.device).float()
        if reference is None:
            reference = self.reference(image)
        k, steps = len(classes), self.steps
        cls = torch.as_tensor(classes, device=self.device, dtype=torch.long)
        del_base, ins_base = self.bases(image)
        ranks = pixel_ranks(maps)
        counts = step_counts(maps[0].numel(), steps)
        inner = torch.as_tensor(counts[1:-1], device=self.device)
        # rows: K of x * M, then for each class its inner deletion steps, then its inner insertion steps
        kind = torch.cat([torch.zeros(k), torch.ones(k * (steps - 1)), torch.full((k * (steps - 1),), 2.0)]).long()
        row_k = torch.cat([torch.arange(k), torch.arange(k).repeat_interleave(steps - 1).repeat(2)]).to(self.device)
        row_n = torch.cat([torch.zeros(k, dtype=torch.long, device=self.device), inner.repeat(k), inner.repeat(k)])
        kind = kind.to(self.device)
        p = torch.empty(kind.numel(), device=self.device)
        h, w = image.shape[-2:]
        rows_per_forward = self.batch if self.device.type == "cuda" else max(1, min(self.batch, CPU_PIXELS // (h * w)))
        for start in range(0, kind.numel(), rows_per_forward):
            sl = slice(start, start + rows_per_forward)
            rk, rn, rkind = row_k[sl], row_n[sl], kind[sl]
            taken = (ranks[rk] < rn[:, None]).view(-1, 1, h, w)  # the first n pixels of the class's order
            rows = torch.where(taken, del_base, image)  # deletion
            rows = torch.where((rkind == 2).view(-1, 1, 1, 1), torch.where(taken, image, ins_base), rows)
            rows = torch.where((rkind == 0).view(-1, 1, 1, 1), image * maps[rk, None], rows)
            p[sl] = self(rows).gather(1, cls[rk, None])[:, 0]
        y, o = reference[0, cls], p[:k]
        deletion = torch.cat([y[:, None], p[k:k + k * (steps - 1)].view(k, steps - 1), reference[1, cls][:, None]], 1)
        insertion = torch.cat([reference[2, cls][:, None], p[k + k * (steps - 1):].view(k, steps - 1), y[:, None]], 1)
        return ImageScores(y.cpu().numpy(), o.cpu().numpy(), deletion.cpu().numpy(), insertion.cpu().numpy(),
                           counts / maps[0].numel())


# ------------------------------------------------------------------------------------------ summaries


@dataclass
class Accumulator:
    """The pairs of one method over the images: -> the summary stored in metrics.json."""

    y: list
    o: list
    deletion: list
    insertion: list
    deletion_auc: list
    insertion_auc: list
    pointing: list
    images: int = 0

    @classmethod
    def empty(cls) -> Accumulator:
        return cls([], [], [], [], [], [], [])

    def add(self, s: ImageScores, pointing: np.ndarray | None = None) -> None:
        self.y.append(s.y)
        self.o.append(s.o)
        self.deletion.append(s.deletion)
        self.insertion.append(s.insertion)
        self.deletion_auc.append(auc(s.deletion, s.fractions))
        self.insertion_auc.append(auc(s.insertion, s.fractions))
        self.pointing.append(np.full(len(s.y), np.nan) if pointing is None else pointing)
        self.images += 1

    def summary(self) -> dict[str, Any]:
        """Means over the pairs; the mean curves at the nominal fractions i / steps (an image's own fractions
        n_i / N differ from them by rounding only: its AUC is taken at its own)."""
        if not self.y:
            return {**dict.fromkeys(KEYS), "pairs": 0, "images": 0, "curves": None}
        y, o = np.concatenate(self.y), np.concatenate(self.o)
        deletion, insertion = np.concatenate(self.deletion), np.concatenate(self.insertion)
        pointing = np.concatenate(self.pointing)
        r4 = lambda v: round(float(v), 4)  # noqa: E731
        return {
            "average_drop": r4(average_drop(y, o)),
            "increase_in_confidence": r4(increase_in_confidence(y, o)),
            "deletion_auc": r4(np.concatenate(self.deletion_auc).mean()),
            "insertion_auc": r4(np.concatenate(self.insertion_auc).mean()),
            "energy_pointing_game": None if np.isnan(pointing).all() else r4(np.nanmean(pointing)),
            "pairs": int(y.size), "images": self.images,
            "curves": {"fraction": [r4(f) for f in np.linspace(0.0, 1.0, deletion.shape[1])],
                       "deletion": [r4(v) for v in deletion.mean(0)], "insertion": [r4(v) for v in insertion.mean(0)]},
        }


# ----------------------------------------------------------------------------------- a run's methods

# the options of ``evaluate.faithfulness`` that the Probe takes (and that change the scores)
PROBE_OPTIONS = ("steps", "deletion_base", "insertion_base", "blur_sigma")


def score_maps(model: nn.Module, ckpt: dict[str, Any], ds, samples: list, gts: dict[str, np.ndarray],
               maps_root: Path, methods: list[str], cfg) -> dict[str, dict[str, Any]]:
    """The summary (:meth:`Accumulator.summary`) of each method in ``methods``, its maps read from
    ``maps_root/<method>/<id>.npz``, on the images ``samples`` of ``ds`` through the classifier ``model``
    (``ckpt``: its checkpoint, for the input normalisation), with the energy pointing game where ``gts`` has the
    image's GT mask. ``cfg``: ``evaluate.faithfulness`` (:data:`PROBE_OPTIONS` and ``batch``)."""
    device = next(iter(model.parameters())).device
    probe = Probe(model, ckpt["mean"], ckpt["std"], fast=True, batch=cfg.batch,
                  **{k: getattr(cfg, k) for k in PROBE_OPTIONS})
    acc = {m: Accumulator.empty() for m in methods}
    for s in tqdm(samples, desc="faithfulness", leave=False):
        image = torch.from_numpy(read_image(s.image_path)).to(device).permute(2, 0, 1).float().div_(255.0)
        reference = probe.reference(image)
        for m in methods:
            path = maps_root / m / f"{s.id}.npz"
            maps, classes = load_maps(path, ds.classes)
            if len(classes) == 0:
                continue
            if maps.shape[-2:] != tuple(image.shape[-2:]):
                raise DataError(f"{path}: maps of size {maps.shape[-1]}x{maps.shape[-2]}, its image is "
                                f"{image.shape[-1]}x{image.shape[-2]}; rerun make_maps with --force")
            scores = probe.scores(image, torch.from_numpy(maps), classes.tolist(), reference)
            gt = gts.get(s.id)
            pointing = None if gt is None else energy_pointing_game(maps, gt, [ds.label_of(c) for c in classes])
            acc[m].add(scores, pointing)
    return {m: acc[m].summary() for m in methods}
