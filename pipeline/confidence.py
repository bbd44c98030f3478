"""A confidence in [0, 1] for every exported pseudo-mask and for every class within it, without ground truth.

Users of a weakly supervised pipeline have no GT masks, so the quality figures that need GT (mIoU, per-class IoU)
cannot tell them which masks or classes to trust. The signals below are what the run already holds; each is in
[0, 1], higher = more trustworthy, and the confidence is their plain mean (no weights, nothing tuned per dataset):

- **agreement**: how well the exported label set agrees with the run's other label sets (``refined/<set>/``: the
  other refiners, raw and walked). Independent refiners that reach the same labels from different cues (colour
  GraphCut, dense CRF, SAM's object edges, the affinity walk) are more likely right where they agree: the usual
  check of pseudo-labels by cross-model agreement (co-training, Blum & Mitchell 1998; the disagreement of an ensemble
  as an error estimate, Lakshminarayanan et al. 2017). Per image: the share of pixels labelled alike, among the
  pixels both label (the exported set's and the other's ignored pixels left out), averaged over the other sets; per
  class: the IoU of the class's pixels between the two sets, averaged the same way.
- **margin**: at each pixel, the map's score of the label the mask gives minus the best other candidate's score,
  clipped to [0, 1] (the margin-based uncertainty of active learning, Scheffer et al. 2001, signed by whether the
  mask follows the map: 0 where it contradicts it). Candidates are the image's classes and, with a background
  class, a background score equal to the threshold refiner's foreground threshold (a pixel is background when no
  map reaches it). Averaged over the pixels the mask labels (per image) or labels as the class (per class). An image
  with a single candidate has nothing to confuse: margin 1.
- **certain** (per image only): the share of pixels that are not ignored (255), the refiner's own uncertainty.

A class of the image's labels that the exported mask does not paint at all gets confidence 0 (a missed object);
the signals a run cannot give (a single label set: no agreement) are left out of the mean. Masks a person corrected
(``wsss import-masks``) have confidence 1.

The classifier's probability for the image's labels and SAM's predicted IoU are not among the signals. Both were
measured on MSRC-21 (``scripts/confidence_check.py --signals``, docs/experiments.md): alone, each follows the masks'
quality far less well than the mean above; added to it, neither moved the measures by more than two runs of the
same recipe differ, and each would cost a pass of the classifier or of SAM's decoder at export.

:func:`run_confidence` computes it for every image of a run (the export stage writes it into ``manifest.json``),
:func:`summarise` over the run, :func:`read_confidence` reads it back for evaluate, the report and ``wsss review``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.data import IGNORE, SegDataset, read_mask
from pipeline.errors import DataError
from pipeline.maps.io import load_maps
from pipeline.runfolder import read_json

SIGNALS = ("agreement", "margin", "certain")  # per image; per class: agreement, margin
LOW_QUANTILE = 25  # percent: an unreliable class is below this percentile (the first quartile) of the run's classes
NOISE = 2.0  # ... and below the run's median by more than this many standard errors of its own mean


def _mean(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def margin_map(maps: np.ndarray, classes: np.ndarray, background: bool, bg_score: float,
               label: np.ndarray) -> np.ndarray:
    """Per pixel, the map's score of the label the mask gives it minus the best other candidate's score, clipped
    to [0, 1] (0 where the mask contradicts the map); maps [K,H,W] in [0,1] of ``classes`` [K], candidates the K
    classes and, with ``background``, a constant background score ``bg_score``. One candidate: 1 where the mask
    gives it. Labels that are no candidate (255, a class the maps lack): 0."""
    h, w = maps.shape[1:]
    rows = {int(c) + int(background): k for k, c in enumerate(classes)}
    stack = maps
    if background:
        rows[0] = len(classes)
        stack = np.concatenate([maps, np.full((1, h, w), bg_score, maps.dtype)], 0)
    lut = np.full(256, -1, np.int64)
    for value, k in rows.items():
        lut[value] = k
    row = lut[label]
    known = row >= 0
    if stack.shape[0] < 2:
        return known.astype(np.float32)
    idx = np.where(known, row, 0)[None]
    own = np.take_along_axis(stack, idx, 0)[0]
    rest = stack.copy()
    np.put_along_axis(rest, idx, -np.inf, 0)
    margin = np.clip(own - rest.max(0), 0.0, 1.0)
    return np.where(known, margin, 0.0).astype(np.float32)


def image_confidence(exported: np.ndarray, others: list[np.ndarray], margin: np.ndarray,
                     labels: dict[int, str]) -> dict[str, Any]:
    """The confidence of one exported label map [H,W] uint8 (255 = ignore): ``others`` the other label sets' maps
    of the image, ``margin`` :func:`margin_map` of this label map, ``labels`` the label index -> name of each class
    the image's labels name (background left out). -> {"confidence", "confidence_signals": {...},
    "class_confidence": {name: {"confidence", ...}}}: the keys of the image's entry in manifest.json."""
    valid = exported != IGNORE
    agree = []
    for other in others:
        both = valid & (other != IGNORE)
        agree.append(float((other[both] == exported[both]).mean()) if both.any() else None)
    signals = {"agreement": _mean(agree) if others else None,
               "margin": float(margin[valid].mean()) if valid.any() else 0.0,
               "certain": float(valid.mean())}
    classes = {}
    for index, name in labels.items():
        mine = exported == index
        if not mine.any():
            classes[name] = {"confidence": 0.0, "agreement": None, "margin": None, "missing": True}
            continue
        ious = []
        for other in others:
            theirs, seen = other == index, other != IGNORE
            union = ((mine & seen) | theirs).sum()
            ious.append(float((mine & theirs).sum() / union) if union else None)
        s = {"agreement": _mean(ious) if others else None, "margin": float(margin[mine].mean())}
        classes[name] = {"confidence": _mean(list(s.values())), **s}
    rounded = {k: None if v is None or np.isnan(v) else round(v, 4) for k, v in signals.items()}
    return {"confidence": round(_mean(list(signals.values())), 4), "confidence_signals": rounded,
            "class_confidence": {n: {k: (round(v, 4) if isinstance(v, float) and not np.isnan(v) else v)
                            for k, v in c.items()} for n, c in classes.items()}}


def run_confidence(ds: SegDataset, refined_dir: Path, exported: str, others: list[str], maps_dir: Path,
                   bg_score: float) -> dict[str, dict[str, Any]]:
    """Image id -> :func:`image_confidence` for every image of ``ds``: the label set ``refined_dir/<exported>``
    against ``refined_dir/<other>`` for each of ``others``, the margin from the maps in ``maps_dir`` (the maps the
    exported set refines). An image whose map file is missing gets margin 0; one without an exported mask, no
    entry."""
    out = {}
    for s in tqdm(ds.samples, desc="confidence", leave=False):
        path = refined_dir / exported / f"{s.id}.png"
        if not path.exists():
            continue  # the export names the missing file
        label = read_mask(path)
        other = [read_mask(refined_dir / o / f"{s.id}.png", label.shape) for o in others
                 if (refined_dir / o / f"{s.id}.png").exists()]
        try:
            maps, classes = load_maps(maps_dir / f"{s.id}.npz", ds.classes)
            margin = margin_map(maps, classes, ds.background, bg_score, label)
        except DataError:
            margin = np.zeros(label.shape, np.float32)
        if margin.shape != label.shape:
            margin = np.zeros(label.shape, np.float32)
        out[s.id] = image_confidence(label, other, margin, {ds.label_of(c): ds.classes[c] for c in s.labels})
    return out


def corrected() -> dict[str, Any]:
    """The confidence entry of a mask a person corrected."""
    return {"confidence": 1.0, "confidence_signals": {}, "class_confidence": {}, "corrected": True}


def unreliable_classes(values: dict[str, list[float]]) -> tuple[list[str], float | None, float | None]:
    """The classes to warn about, ranked within the run: ``values`` class -> its confidences over the run's images.
    Returns (the classes, least confident first; the run's first quartile and median of the class means, None with
    fewer than two classes).

    A class is unreliable when its mean confidence is below the first quartile of the run's class means (the lowest
    quarter of the classes, strictly, so that classes alike are never split) and below the run's median by more
    than ``NOISE`` standard errors of its own mean (so that neither a run whose classes are all alike nor one noisy
    class seen in few images gets a warning by chance; a class seen in one image has no spread, and its rank alone
    decides). Why by rank and not by a fixed cut: the confidence's level depends on the dataset (the maps' margin
    seldom nears 1 on real photos, and sits higher on clean synthetic shapes), so a cut set on one dataset says
    little of another; what was measured is that the confidence ranks the classes by quality (its Spearman
    correlation with the class IoU, docs/results.md). The quartile and the two standard errors are the usual
    statistics of a lower tail and of a mean's noise, not values fitted to any dataset's ground truth."""
    means = {c: float(np.mean(v)) for c, v in values.items() if v}
    if len(means) < 2:
        return [], None, None
    quartile, median = (float(q) for q in np.percentile(list(means.values()), [LOW_QUANTILE, 50]))
    out = []
    for c, m in means.items():
        n = len(values[c])
        se = float(np.std(values[c], ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        if m < quartile and m + NOISE * se < median:
            out.append(c)
    return sorted(out, key=means.get), quartile, median


def summarise(per_image: dict[str, dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Over the run: the mean image confidence, each class's mean over the images whose labels name it (corrected
    images left out of both: a person's mask says nothing of the pipeline's), and the unreliable classes
    (:func:`unreliable_classes`, with the run's first quartile and median of the class means they are measured
    against)."""
    auto = {i: v for i, v in per_image.items() if not v.get("corrected") and v.get("confidence") is not None}
    values = {}
    for name in classes:
        vals = [v["class_confidence"][name]["confidence"] for v in auto.values()
                if name in (v.get("class_confidence") or {})]
        if vals:
            values[name] = vals
    unreliable, quartile, median = unreliable_classes(values)
    return {"mean": round(_mean([v["confidence"] for v in auto.values()]), 4) if auto else None,
            "per_class": {c: round(float(np.mean(v)), 4) for c, v in values.items()}, "unreliable": unreliable,
            "quartile": None if quartile is None else round(quartile, 4),
            "median": None if median is None else round(median, 4),
            "corrected": sum(1 for v in per_image.values() if v.get("corrected")), "signals": list(SIGNALS)}


def review_order(manifest: dict[str, Any]) -> list[str]:
    """The manifest's images, least confident first (ties by id); corrected images are left out."""
    images = manifest.get("images") or {}
    todo = [(v.get("confidence", 0.0), i) for i, v in images.items() if not v.get("corrected")]
    return [i for _, i in sorted(todo, key=lambda t: (float("inf") if t[0] is None else t[0], t[1]))]


def read_confidence(run_dir: Path) -> dict[str, Any] | None:
    """The export's manifest.json (per image ``confidence``, ``confidence_signals``, ``class_confidence``; over the
    run ``confidence``: :func:`summarise`), or None without an export."""
    path = Path(run_dir) / "pseudo_masks" / "manifest.json"
    try:
        return read_json(path) if path.exists() else None
    except (OSError, ValueError):
        return None


def confidence_metrics(manifest: dict[str, Any] | None, scored: dict[str, Any] | None) -> dict[str, Any] | None:
    """metrics.json's ``confidence``: the export's summary (per class over the run, no GT needed) and, where
    ``scored`` (metrics.json's ``pseudo_masks``, with GT) has the exported set, its IoU per class beside it."""
    if not manifest or not manifest.get("confidence"):
        return None
    out = {"exported": manifest.get("refiner"), **manifest["confidence"]}
    per_class = ((scored or {}).get(manifest.get("refiner")) or {}).get("per_class")
    if per_class:
        out["iou"] = {c: (per_class.get(c) or {}).get("iou") for c in out["per_class"]}
    return out
