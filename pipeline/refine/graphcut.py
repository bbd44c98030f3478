"""GraphCut refiner: GrabCut-style colour segmentation seeded by a class map, after Simonyan et al. 2014
("Deep Inside Convolutional Networks: Visualising Image Classification Models and Saliency Maps",
section 3.1: foreground / background colour GMMs from the most / least salient pixels, then GraphCut).
Works from any class map (CAM, saliency, ...). ``cv2`` is imported inside the functions.

One cut per present class ``c`` with map ``m``:
- ``GC_FGD`` (sure foreground seeds): ``m >= quantile(m, fg_quantile)`` (and ``m > 0``);
- ``GC_BGD`` (sure background seeds): ``m <= quantile(m, bg_quantile)``;
- the rest ``GC_PR_FGD`` where ``m >= mid``, else ``GC_PR_BGD``;
- ``cv2.grabCut`` with that mask, ``iterations`` rounds (5-component colour GMMs + min cut), RNG seeded
  with ``cv2.setRNGSeed(0)`` before the call and one OpenCV thread, so the result is byte-identical
  across runs and process-pool sizes. The cut *claims* the pixels it ends with as (probably)
  foreground. A class whose map is all zero claims nothing; one whose seeds leave fewer than
  ``_MIN_SAMPLES`` pixels on either side (too few to fit a GMM) claims ``m >= mid``.

Combining the cuts:
- a pixel claimed by one or more cuts takes, among those classes, the one with the highest map value
  (overlaps resolved by map score; ties go to the earlier class);
- a pixel claimed by no cut is background with a background class; without one, it takes the argmax of
  all the image's maps (the present classes compete, as in the threshold refiner).
- ``ignore_uncertain`` (255 where no cut is confident): without a background class, every pixel no cut
  claims; with one, the unclaimed pixels whose best map is still ``>= mid`` (the map says foreground,
  the colour model disagrees).
"""

from __future__ import annotations

import numpy as np

from pipeline.config import GraphCutConfig, RefineConfig
from pipeline.data.dataset import IGNORE
from pipeline.errors import DataError
from pipeline.refine import register_refiner

_MIN_SAMPLES = 16  # pixels needed on each side of the initial mask to fit a 5-component GMM


def grabcut_claim(image: np.ndarray, m: np.ndarray, cfg: GraphCutConfig) -> np.ndarray:
    """bool [H,W]: the pixels that the cut seeded by one class map ``m`` [H,W] in [0,1] calls foreground."""
    import cv2

    if not (m > 0).any():
        return np.zeros(m.shape, bool)
    hi, lo = np.quantile(m, [cfg.fg_quantile, cfg.bg_quantile])
    fg_seed = (m >= hi) & (m > 0)
    bg_seed = (m <= lo) & ~fg_seed
    mask = np.where(m >= cfg.mid, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    mask[fg_seed] = cv2.GC_FGD
    mask[bg_seed] = cv2.GC_BGD
    n_fg = int(((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).sum())
    if n_fg < _MIN_SAMPLES or mask.size - n_fg < _MIN_SAMPLES:
        return m >= cfg.mid
    cv2.setNumThreads(1)
    cv2.setRNGSeed(0)
    bgd_model = np.zeros((1, 65), np.float64)
    fgd_model = np.zeros((1, 65), np.float64)
    cv2.grabCut(np.ascontiguousarray(image, dtype=np.uint8), mask, None, bgd_model, fgd_model,
                cfg.iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def graphcut_labels(maps: np.ndarray, classes: np.ndarray, image: np.ndarray, background: bool,
                    cfg: GraphCutConfig) -> np.ndarray:
    """maps [K,H,W] in [0,1], classes [K], image HxWx3 uint8 -> uint8 labels [H,W] in the label index space."""
    classes = np.asarray(classes, dtype=np.int64)
    shape = maps.shape[1:]
    if maps.shape[0] == 0:
        return np.zeros(shape, np.uint8) if background else np.full(shape, IGNORE, np.uint8)
    if image is None:
        raise ValueError("graphcut needs the image")
    if image.shape[:2] != shape:
        raise DataError(f"graphcut: image is {image.shape[1]}x{image.shape[0]} but its maps are "
                        f"{shape[1]}x{shape[0]}; rerun make_maps with --force")
    if not background and maps.shape[0] == 1:
        return np.full(shape, classes[0], np.uint8)  # one class, nothing competes with it
    claims = np.stack([grabcut_claim(image, m, cfg) for m in maps])
    claimed = claims.any(0)
    best_claimed = np.where(claims, maps, -1.0).argmax(0)
    label = (classes[best_claimed] + int(background)).astype(np.uint8)
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
