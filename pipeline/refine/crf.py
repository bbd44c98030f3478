"""Dense CRF refiner: fully connected CRF with Gaussian edge potentials, Krähenbühl & Koltun 2011
("Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011), via
``pydensecrf`` (imported inside the functions, so machines without it can still make maps).

Unary. The CRF's labels are the image's classes, plus background where the dataset has one, so no other
label can come out. Class scores are ``map_k ** power``, divided by ``(their mean over the image) **
mean_norm`` (a broad "stuff" map such as grass then weighs less against a peaked object map) and by the
largest score, so they stay in [0, 1]. With a background class a background score ``(1 - max_k map_k)
** alpha`` is added (the AffinityNet / IRN rule, on the raw maps). The scores are normalised to
probabilities per pixel (a pixel where every score is 0 gets a uniform distribution), clipped to
``[eps, 1]``, and the unary is ``-log p``. The CAMs are used as a weak unary (``power`` < 1) that the
bilateral term, i.e. the image, corrects (a softmax of scaled scores and ``power > 1`` were tried:
docs/experiments.md).

Pairwise. A Gaussian smoothness kernel (``gauss_sxy``, ``gauss_compat``) and a bilateral appearance
kernel (``bilateral_sxy``, ``bilateral_srgb``, ``bilateral_compat``), Potts compatibilities;
``iterations`` mean-field steps. The label is the argmax of the posterior.

Confidence band (255 = ignore), IRN-style, with a background class: two CRF runs that lean different
ways, one with a foreground-confident background score (``alpha_fg``, the higher alpha: weaker
background, more foreground), one with a background-confident one (``alpha_bg``, the lower alpha); where
their label maps agree the pixel keeps that label, where they disagree it becomes 255
(:func:`crf_band_runs` gives the two runs). ``band`` off: one run with ``alpha``. Without a background
class there is one run and no band: every pixel is one of the image's classes, and an ignored pixel
would only be a miss (docs/experiments.md#option-decisions-issue-28).
"""

from __future__ import annotations

import numpy as np

from pipeline.config import CRFConfig, RefineConfig
from pipeline.data.dataset import IGNORE
from pipeline.errors import DataError
from pipeline.refine._registry import register_refiner


def crf_probabilities(maps: np.ndarray, background: bool, alpha: float, power: float = 1.0,
                      mean_norm: float = 0.0) -> np.ndarray:
    """maps [K,H,W] in [0,1] -> label probabilities [K(+1),H,W] float32 (background first, if any)."""
    maps = np.clip(maps, 0.0, 1.0).astype(np.float32)
    scores = maps**power if power != 1.0 else maps.copy()
    if mean_norm > 0:
        scores /= np.maximum(scores.mean((1, 2), keepdims=True), 1e-6) ** mean_norm
        scores /= max(float(scores.max(initial=0.0)), 1e-6)
    if background:
        bg = (1.0 - maps.max(0, initial=0.0)) ** alpha
        scores = np.concatenate([bg[None], scores], 0)
    total = scores.sum(0, keepdims=True)
    uniform = np.float32(1.0 / scores.shape[0])
    return np.where(total > 0, scores / np.maximum(total, 1e-12), uniform).astype(np.float32)


def crf_posterior(probs: np.ndarray, image: np.ndarray | None, cfg: CRFConfig) -> np.ndarray:
    """Mean-field posterior [L,H,W] of the dense CRF whose unary is -log(clip(probs, eps, 1)).

    Without an image only the Gaussian smoothness kernel is used."""
    import pydensecrf.densecrf as dcrf

    n_labels, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, n_labels)
    unary = -np.log(np.clip(probs, cfg.eps, 1.0)).reshape(n_labels, -1)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    if cfg.gauss_compat > 0:
        d.addPairwiseGaussian(sxy=cfg.gauss_sxy, compat=cfg.gauss_compat)
    if image is not None and cfg.bilateral_compat > 0:
        d.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb,
                               rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=cfg.bilateral_compat)
    q = d.inference(cfg.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def _run(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None, background: bool, alpha: float,
         cfg: CRFConfig) -> np.ndarray:
    """One CRF run -> labels in the label index space (background, if any, is CRF label 0)."""
    q = crf_posterior(crf_probabilities(maps, background, alpha, cfg.power, cfg.mean_norm), image, cfg)
    lut = np.concatenate([[0], classes + 1]) if background else classes
    return lut[q.argmax(0)].astype(np.uint8)


def _check(maps: np.ndarray, image: np.ndarray | None) -> None:
    if image is not None and image.shape[:2] != maps.shape[1:]:
        raise DataError(f"crf: image is {image.shape[1]}x{image.shape[0]} but its maps are "
                        f"{maps.shape[2]}x{maps.shape[1]}; rerun make_maps with --force")


def crf_band_runs(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None,
                  cfg: CRFConfig) -> tuple[np.ndarray, np.ndarray]:
    """The two label maps of the band (with a background class): the foreground-confident (``alpha_fg``) and
    the background-confident (``alpha_bg``) runs. With ``band`` on, ``crf`` gives their common label where
    they agree and 255 where they differ."""
    classes = np.asarray(classes, dtype=np.int64)
    _check(maps, image)
    return (_run(maps, classes, image, True, cfg.alpha_fg, cfg),
            _run(maps, classes, image, True, cfg.alpha_bg, cfg))


def crf_labels(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None, background: bool,
               cfg: CRFConfig) -> np.ndarray:
    """maps [K,H,W] in [0,1], classes [K] -> uint8 labels [H,W] in the label index space."""
    classes = np.asarray(classes, dtype=np.int64)
    shape = maps.shape[1:]
    if maps.shape[0] == 0:
        return np.zeros(shape, np.uint8) if background else np.full(shape, IGNORE, np.uint8)
    if not background and maps.shape[0] == 1:
        return np.full(shape, classes[0], np.uint8)  # one class, nothing competes with it
    _check(maps, image)
    if cfg.band and background:
        first, second = crf_band_runs(maps, classes, image, cfg)
        first[first != second] = IGNORE
        return first
    return _run(maps, classes, image, background, cfg.alpha, cfg)


@register_refiner("crf", needs_image=True)
def crf(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None, background: bool,
        cfg: RefineConfig) -> np.ndarray:
    return crf_labels(maps, classes, image, background, cfg.crf)
