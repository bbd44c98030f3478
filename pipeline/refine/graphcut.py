"""GraphCut refiner: GrabCut-style colour segmentation seeded by class maps, after Simonyan et al. 2014
("Deep Inside Convolutional Networks: Visualising Image Classification Models and Saliency Maps",
section 3.1: foreground / background colour GMMs from the most / least salient pixels, then GraphCut).
Works from any class map (CAM, saliency, ...).

One cut per present class ``c`` with map ``m``; its initial mask:
- ``GC_FGD`` (sure foreground seeds): ``m >= quantile(m, fg_quantile)``, ``m > 0``, and ``c`` is the
  image's best class there (the argmax of the maps: a seed never sits where another class dominates);
- ``GC_BGD`` (sure background seeds): ``m <= quantile(m, bg_quantile)``;
- the rest ``GC_PR_FGD`` where ``c`` is the argmax of the maps (and, with a background class, also
  ``m >= mid``), else ``GC_PR_BGD``.
``cv2.grabCut`` runs ``iterations`` rounds (5-component colour GMMs + min cut) from that mask, with
``cv2.setRNGSeed(0)`` before the call and one OpenCV thread, so the result is byte-identical across
runs and process-pool sizes. The cut *claims* the pixels it ends with as (probably) foreground. A class
whose map is all zero claims nothing; one whose mask leaves fewer than ``_MIN_SAMPLES`` pixels on
either side (too few to fit a GMM) claims its initial probably-foreground region unchanged.

Combining the cuts:
- a pixel claimed by one or more cuts takes the class whose cut claims the fewest pixels (the more
  specific one, e.g. the cow rather than the grass around it; ties by map value);
- a pixel claimed by no cut is background with a background class; without one, it takes the argmax of
  all the image's maps (the present classes compete, as in the threshold refiner).
- ``ignore_uncertain`` marks 255 where no cut is confident: without a background class every pixel no
  cut claims; with one, the unclaimed pixels whose best map is still ``>= mid`` (the map says
  foreground, the colour model disagrees).
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.config import GraphCutConfig, RefineConfig
from pipeline.data.dataset import IGNORE
from pipeline.errors import DataError
from pipeline.refine._registry import register_refiner

_MIN_SAMPLES = 16  # pixels needed on each side of the initial mask to fit a 5-component colour GMM


def grabcut_mask(maps: np.ndarray, k: int, background: bool, cfg: GraphCutConfig) -> np.ndarray:
    """The initial GrabCut mask [H,W] uint8 (cv2.GC_* values) of the cut for class row ``k`` of ``maps``."""
    m = maps[k]
    best = maps.argmax(0) == k
    hi, lo = np.quantile(m, [cfg.fg_quantile, cfg.bg_quantile])
    probable = best & (m >= cfg.mid) if background else best
    mask = np.where(probable, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    fg_seed = (m >= hi) & (m > 0) & best
    mask[(m <= lo) & ~fg_seed] = cv2.GC_BGD
    mask[fg_seed] = cv2.GC_FGD
    return mask


def grabcut_claim(image: np.ndarray, mask: np.ndarray, iterations: int) -> np.ndarray:
    """bool [H,W]: the pixels GrabCut, started from ``mask`` (cv2.GC_* values), ends with as foreground."""
    fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    n_fg = int(fg.sum())
    if n_fg < _MIN_SAMPLES or mask.size - n_fg < _MIN_SAMPLES:
        return fg
    cv2.setNumThreads(1)  # one thread per worker process: the pool scales, the result does not change
    cv2.setRNGSeed(0)  # grabCut's k-means initialisation draws from OpenCV's RNG
    mask = mask.copy()
    bgd_model = np.zeros((1, 65), np.float64)
    fgd_model = np.zeros((1, 65), np.float64)
    cv2.grabCut(np.ascontiguousarray(image, dtype=np.uint8), mask, None, bgd_model, fgd_model, iterations,
                cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def _overlap_scores(maps: np.ndarray, claims: np.ndarray) -> np.ndarray:
    """Which claiming cut wins a pixel: the smallest cut, then the higher map value (< 1, so area comes first)."""
    return -claims.sum((1, 2), keepdims=True) + maps


def graphcut_labels(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None, background: bool,
                    cfg: GraphCutConfig) -> np.ndarray:
    """maps [K,H,W] in [0,1], classes [K], image HxWx3 uint8 -> uint8 labels [H,W] in the label index space."""
    classes = np.asarray(classes, dtype=np.int64)
    shape = maps.shape[1:]
    if maps.shape[0] == 0:
        return np.zeros(shape, np.uint8) if background else np.full(shape, IGNORE, np.uint8)
    if not background and maps.shape[0] == 1:
        return np.full(shape, classes[0], np.uint8)  # one class, nothing competes with it
    if image is None:
        raise ValueError("graphcut needs the image")
    if image.shape[:2] != shape:
        raise DataError(f"graphcut: image is {image.shape[1]}x{image.shape[0]} but its maps are "
                        f"{shape[1]}x{shape[0]}; rerun make_maps with --force")
    claims = np.zeros(maps.shape, bool)
    for k in range(maps.shape[0]):
        if (maps[k] > 0).any():
            claims[k] = grabcut_claim(image, grabcut_mask(maps, k, background, cfg), cfg.iterations)
    claimed = claims.any(0)
    winner = np.where(claims, _overlap_scores(maps, claims), -np.inf).argmax(0)
    label = (classes[winner] + int(background)).astype(np.uint8)
    if background:
        label[~claimed] = 0
        if cfg.ignore_uncertain:
            label[~claimed & (maps.max(0) >= cfg.mid)] = IGNORE
    else:
        label[~claimed] = classes[maps.argmax(0)][~claimed].astype(np.uint8)
        if cfg.ignore_uncertain:
            label[~claimed] = IGNORE
    return label


@register_refiner("graphcut", needs_image=True)
def graphcut(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None, background: bool,
             cfg: RefineConfig) -> np.ndarray:
    return graphcut_labels(maps, classes, image, background, cfg.graphcut)
