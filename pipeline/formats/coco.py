"""COCO instances export (detectron2, mmdet): ``exports/coco/images/<id>.jpg`` and
``exports/coco/annotations/instances_train.json``.

One annotation per 8-connected component of each object class in each label map, its ``segmentation`` a compressed
RLE (the COCO API's column-major run lengths, written as its ASCII string), ``area`` its pixel count, ``bbox``
``[x, y, width, height]`` of its pixels, ``iscrowd`` 0. Categories are the object classes, ids 1..C in label order;
a background label (index 0 of a dataset with one) is no category. The ignore value (255, uncertain pixels) belongs
to no annotation: a detector reads it as background. Each image entry also carries ``ignore_pixels``, the count
of such pixels (readers skip keys they do not know).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.formats._registry import IGNORE, ExportSource, components, place_image, register_format
from pipeline.runfolder import write_json

ANNOTATIONS = "annotations/instances_train.json"


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary HxW mask in column-major order, starting with a run of zeros (maybe empty)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat.size and flat[0] else counts


def rle_string(counts: list[int]) -> str:
    """The COCO API's compressed form of run lengths: each count (from the third on, minus the count two before
    it) in little-endian groups of 5 bits, bit 6 set while more groups follow, each group + 48 as a character."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        while True:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends at -1
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + (0x20 if more else 0) + 48))
            if not more:
                break
    return "".join(out)


def rle_from_string(s: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (the inverse of :func:`rle_string`); a ``ValueError`` when
    the string is not one."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, shift, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("the RLE string ends inside a count")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} is not in the RLE alphabet")
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                x |= -1 << shift  # sign extension
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (``counts`` a compressed string or a list of run lengths; ``size`` [h, w]) as a bool HxW mask; a
    ``ValueError`` saying what is wrong when it is not a valid one."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"its run lengths cover {sum(counts)} pixels, not {h}x{w} = {h * w}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape((w, h)).T


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask as COCO compressed RLE: ``{"size": [h, w], "counts": str}``."""
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_string(rle_counts(mask))}


def bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@register_format("coco")
def write_coco(source: ExportSource, out_dir: Path, final_dir: Path) -> dict[str, Any]:
    images, annotations = [], []
    for image_id, (item, label) in enumerate(source.labels("coco"), start=1):
        name = f"{item.id}.jpg"
        place_image(item.image, out_dir / "images" / name, source.images)
        h, w = label.shape
        images.append({"id": image_id, "file_name": name, "height": int(h), "width": int(w),
                       "ignore_pixels": int((label == IGNORE).sum())})
        for value, mask in components(label):
            k = source.class_of(value)
            if k is None:
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": k + 1,
                                "segmentation": encode_rle(mask), "area": int(mask.sum()), "bbox": bbox(mask),
                                "iscrowd": 0})
    categories = [{"id": k + 1, "name": name, "supercategory": "object"} for k, name in enumerate(source.classes)]
    info = {"description": "pseudo-masks of the wsss pipeline", **{k: source.manifest[k] for k in
                                                                    ("refiner", "map_method") if k in source.manifest}}
    write_json(out_dir / ANNOTATIONS, {"info": info, "images": images, "annotations": annotations,
                                       "categories": categories})
    return {"images": len(images), "annotations": len(annotations)}
