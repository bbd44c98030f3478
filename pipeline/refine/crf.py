"""Dense CRF refiner: fully connected CRF with Gaussian edge potentials, Krähenbühl & Koltun 2011
("Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011), via
``pydensecrf`` (imported inside the functions, so machines without it can still make maps).

Unary. The CRF's labels are the image's classes, plus background where the dataset has one; no other
label can come out. Class scores are ``map_k ** power``; with a background class a background score
``(1 - max_k map_k) ** alpha`` is added (the AffinityNet / IRN rule). The scores are normalised to
probabilities per pixel (a pixel where every score is 0 gets a uniform distribution), clipped to
``[eps, 1]`` and the unary is ``-log p``.

Pairwise. A Gaussian smoothness kernel (``gauss_sxy``, ``gauss_compat``) and a bilateral appearance
kernel (``bilateral_sxy``, ``bilateral_srgb``, ``bilateral_compat``) with Potts compatibilities;
``iterations`` mean-field steps. The label is the argmax of the posterior.

Confidence band (255 = ignore).
- With a background class and ``band`` on (IRN's band): the CRF runs twice, once with a
  foreground-confident background score (``alpha_fg``, high: background weak, more foreground) and
  once with a background-confident one (``alpha_bg``, low: background strong). Where the two label
  maps agree the pixel keeps that label; where they disagree it becomes 255. With ``band`` off, one
  run with ``alpha``.
- Without a background class there is no background score to vary, so the band is the CRF's own
  uncertainty: 255 where the top posterior probability is below ``min_confidence`` (0 = no band).
  ``min_confidence`` applies with a background class too, on top of the two-run band.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import CRFConfig, RefineConfig
from pipeline.data.dataset import IGNORE
from pipeline.errors import DataError
from pipeline.refine import register_refiner


def crf_probabilities(maps: np.ndarray, background: bool, alpha: float, power: float = 1.0,
                      softmax_scale: float = 0.0) -> np.ndarray:
    """maps [K,H,W] in [0,1] -> label probabilities [K(+1),H,W] float32 (background first if any)."""
    scores = np.clip(maps, 0.0, 1.0).astype(np.float32)
    if power != 1.0:
        scores = scores**power
    if background:
        bg = (1.0 - np.clip(maps, 0.0, 1.0).max(0, initial=0.0)) ** alpha
        scores = np.concatenate([bg[None].astype(np.float32), scores], 0)
    if softmax_scale > 0:
        e = np.exp(softmax_scale * (scores - scores.max(0, keepdims=True)))
        return (e / e.sum(0, keepdims=True)).astype(np.float32)
    total = scores.sum(0, keepdims=True)
    uniform = np.float32(1.0 / scores.shape[0])
    return np.where(total > 0, scores / np.maximum(total, 1e-12), uniform).astype(np.float32)


def crf_posterior(probs: np.ndarray, image: np.ndarray | None, cfg: CRFConfig) -> np.ndarray:
    """Mean-field posterior [L,H,W] of the dense CRF whose unary is -log(clip(probs, eps, 1))."""
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


def _posterior(maps: np.ndarray, image: np.ndarray | None, cfg: CRFConfig, alpha: float) -> np.ndarray:
    return crf_posterior(crf_probabilities(maps, True, alpha, cfg.power, cfg.softmax_scale), image, cfg)


def _to_labels(q: np.ndarray, classes: np.ndarray, background: bool, min_confidence: float) -> np.ndarray:
    """Posterior [L,H,W] -> labels in the label index space (background, if any, is CRF label 0)."""
    lut = np.concatenate([[0], classes + 1]) if background else classes
    label = lut[q.argmax(0)].astype(np.uint8)
    if min_confidence > 0:
        label[q.max(0) < min_confidence] = IGNORE
    return label


def _check(maps: np.ndarray, image: np.ndarray | None) -> None:
    if image is not None and image.shape[:2] != maps.shape[1:]:
        raise DataError(f"crf: image is {image.shape[1]}x{image.shape[0]} but its maps are "
                        f"{maps.shape[2]}x{maps.shape[1]}; rerun make_maps with --force")


def crf_band_runs(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None,
                  cfg: CRFConfig) -> tuple[np.ndarray, np.ndarray]:
    """With a background class: the label maps of the foreground-confident (``alpha_fg``) and the
    background-confident (``alpha_bg``) runs, without ``min_confidence``; ``crf`` marks 255 where they differ."""
    classes = np.asarray(classes, dtype=np.int64)
    _check(maps, image)
    fg_q, bg_q = (_posterior(maps, image, cfg, a) for a in (cfg.alpha_fg, cfg.alpha_bg))
    return _to_labels(fg_q, classes, True, 0.0), _to_labels(bg_q, classes, True, 0.0)


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
    if background and cfg.band:
        qs = [_posterior(maps, image, cfg, a) for a in (cfg.alpha_fg, cfg.alpha_bg)]
        fg_run, bg_run = (_to_labels(q, classes, True, cfg.min_confidence) for q in qs)
        fg_run[fg_run != bg_run] = IGNORE  # also where either run is below min_confidence
        return fg_run
    q = crf_posterior(crf_probabilities(maps, background, cfg.alpha, cfg.power, cfg.softmax_scale), image, cfg)
    return _to_labels(q, classes, background, cfg.min_confidence)


@register_refiner("crf", needs_image=True)
def crf(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None, background: bool,
        cfg: RefineConfig) -> np.ndarray:
    return crf_labels(maps, classes, image, background, cfg.crf)
