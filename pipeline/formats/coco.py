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
from pipeline.rle import encode_rle
from pipeline.runfolder import write_json

ANNOTATIONS = "annotations/instances_train.json"


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
