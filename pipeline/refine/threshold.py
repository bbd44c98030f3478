"""Threshold refiner: the usual CAM-to-seed rule, with a confidence band of ignored pixels.

With a background class: a pixel takes the class of its highest normalised map when that map is
>= ``fg``, background when every map is < ``bg``, and 255 (ignore) in between. Without one: the argmax
over the image's classes, and 255 where the margin between the two best maps is < ``min_margin``.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import RefineConfig
from pipeline.data.dataset import IGNORE
from pipeline.refine._registry import register_refiner


def threshold_labels(maps: np.ndarray, classes: np.ndarray, background: bool, fg: float, bg: float | None = None,
                     min_margin: float = 0.0) -> np.ndarray:
    """maps [K,H,W] in [0,1], classes [K] -> uint8 labels [H,W] (label index space)."""
    classes = np.asarray(classes)
    if maps.shape[0] == 0:
        return np.zeros(maps.shape[1:], np.uint8) if background else np.full(maps.shape[1:], IGNORE, np.uint8)
    best = maps.argmax(0)
    label = (classes[best] + int(background)).astype(np.uint8)
    if background:
        top = np.take_along_axis(maps, best[None], 0)[0]
        bg = fg if bg is None else min(bg, fg)
        label[top < fg] = IGNORE
        label[top < bg] = 0
    elif min_margin > 0 and maps.shape[0] > 1:
        top2 = np.partition(maps, -2, axis=0)[-2:]
        label[(top2[1] - top2[0]) < min_margin] = IGNORE
    return label


@register_refiner("threshold")
def threshold(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None, background: bool,
              cfg: RefineConfig) -> np.ndarray:
    t = cfg.threshold
    return threshold_labels(maps, classes, background, t.fg, t.bg, t.min_margin)
