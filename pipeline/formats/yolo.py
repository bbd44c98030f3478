"""Ultralytics YOLO segmentation export: ``exports/yolo/images/train/<id>.jpg``, ``labels/train/<id>.txt`` and
``data.yaml`` (``path``, ``train``, ``val``, ``names``).

Each line of a label file is one 8-connected component of one object class: ``<class> x1 y1 x2 y2 ...``, the
class 0-based among the object classes (a background label is no class: YOLO reads unlabelled pixels as
background) and the outer contour's vertices (OpenCV's ``findContours``, straight runs reduced to their ends) as
pixel centres divided by the image's width and height (Ultralytics scales a point back by the image size and
truncates it to an integer for ``cv2.fillPoly``, which gives back the contour's pixel, so it rasterises the
component's pixels). Without a background class every label is a class, and the one that fills the rest of an image
is one large polygon under the others. Two rules of the format shape what is kept:
- a polygon has no holes, so a component with holes (a ring) is written as its outer outline, holes filled;
- a polygon needs 3 points and an area, so a component whose outline encloses none (a single pixel, a line one
  pixel wide) is dropped, and a component of a few pixels loses up to half a pixel along its outline.
The ignore value (uncertain pixels) is in no polygon. ``val`` names the same images as ``train``: the pseudo-masks
have no held-out set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from pipeline.formats._registry import ExportSource, components, place_image, register_format
from pipeline.runfolder import write_text


def polygon(mask: np.ndarray) -> np.ndarray | None:
    """The outer contour of a connected binary mask as an [N, 2] array of (x, y) pixel centres, or None when it
    has fewer than 3 points or encloses no area."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    if len(contour) < 3 or cv2.contourArea(contour) <= 0:
        return None
    return contour[:, 0, :]


def label_lines(source: ExportSource, label: np.ndarray) -> list[str]:
    h, w = label.shape
    lines = []
    for value, mask in components(label):
        k = source.class_of(value)
        if k is None:
            continue
        poly = polygon(mask)
        if poly is None:
            continue
        xy = (poly + 0.5) / np.array([w, h])
        lines.append(f"{k} " + " ".join(f"{v:.6f}" for v in xy.ravel()))
    return lines


def data_yaml(root: Path, source: ExportSource) -> str:
    names = dict(enumerate(source.classes))
    return yaml.safe_dump({"path": str(root.resolve()), "train": "images/train", "val": "images/train",
                           "names": names}, sort_keys=False, allow_unicode=True)


@register_format("yolo")
def write_yolo(source: ExportSource, out_dir: Path, final_dir: Path) -> dict[str, Any]:
    n_lines = 0
    (out_dir / "labels" / "train").mkdir(parents=True, exist_ok=True)
    for item, label in source.labels("yolo"):
        place_image(item.image, out_dir / "images" / "train" / f"{item.id}.jpg", source.images)
        lines = label_lines(source, label)
        n_lines += len(lines)
        (out_dir / "labels" / "train" / f"{item.id}.txt").write_text("".join(f"{ln}\n" for ln in lines), "utf-8")
    write_text(out_dir / "data.yaml", data_yaml(final_dir, source))
    return {"images": len(source.items), "polygons": n_lines}
