"""CVAT "Segmentation mask 1.1" export, the layout CVAT imports to correct masks in its editor:
``exports/cvat/labelmap.txt``, ``ImageSets/Segmentation/default.txt``, ``SegmentationClass/<id>.png`` (RGB: each
pixel the colour of its label in labelmap.txt), ``SegmentationObject/<id>.png`` (palette: object indices, 0 = none;
:func:`object_map`) and ``JPEGImages/<id>.jpg``.

CVAT reads the package with datumaro's VOC segmentation reader, which makes one mask annotation per object index of
``SegmentationObject`` (its class from ``SegmentationClass``) and none for index 0: a pixel without an object is
unpainted in CVAT, and comes back as CVAT's ``background``. So every pixel that is not of the background class has
an object, the ignored ones included (as objects of the label ``ignore``), and when an image has more components than
object indices, the smallest are merged per label (:func:`object_map`).

Colours: a background class is black (0, 0, 0), CVAT's background; each object class has the PASCAL VOC colour of
its 1-based class number, so no class is black in a dataset without a background class either (labelmap.txt then
still lists ``background``, which no pixel uses). The ignore value (255, uncertain pixels) is the label ``ignore``
in VOC's void colour (224, 224, 192): CVAT refuses a colour that labelmap.txt does not declare, and a person
correcting the masks should see which pixels are uncertain.

:func:`write_cvat` takes plain (id, image path, label map) tuples, so any subset of images can be packed (a
review package picks the images to correct).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from pipeline.formats._registry import IGNORE, ExportSource, place_image, register_format
from pipeline.runfolder import atomic_write_bytes, voc_palette, write_text

IGNORE_LABEL = "ignore"
MAX_OBJECTS = 254  # SegmentationObject indices 1..254 (255 is VOC's void)


def label_colours(class_names: Sequence[str], background: bool) -> dict[str, tuple[int, int, int]]:
    """labelmap.txt's labels in order -> RGB: the background (``class_names[0]`` with ``background``, else a
    ``background`` label no pixel uses), the classes, ignore."""
    palette = voc_palette()
    colour = [tuple(palette[3 * i: 3 * i + 3]) for i in range(256)]
    names = list(class_names)
    classes = names[int(background):]
    return {names[0] if background else "background": (0, 0, 0),
            **{name: colour[k + 1] for k, name in enumerate(classes)}, IGNORE_LABEL: colour[IGNORE]}


def _lut(class_names: Sequence[str], background: bool) -> np.ndarray:
    """Label index -> RGB, a [256, 3] uint8 table (unused indices black)."""
    colours = label_colours(class_names, background)
    lut = np.zeros((256, 3), np.uint8)
    for index, name in enumerate(class_names):
        lut[index] = colours[name]
    lut[IGNORE] = colours[IGNORE_LABEL]
    return lut


def object_map(label: np.ndarray, background: bool) -> np.ndarray:
    """SegmentationObject's indices for a label map [H,W] uint8 (255 = ignore): each 8-connected component of each
    label value, ignore included and a background class (index 0 with ``background``) left out, gets an index of
    its own, the largest first (ties in label order, then OpenCV's scan order). An image with more components than
    :data:`MAX_OBJECTS` keeps an index per component for the largest ones and merges the rest per label value into
    one object each, so that every pixel but the background's keeps an object, and with it its label, through
    CVAT's reader. Raises ValueError when the image has more label values than indices."""
    parts = []  # (area, label value, component number within the value)
    comps = {}
    for value in np.unique(label).tolist():
        if background and value == 0:
            continue
        _, comp, stats, _ = cv2.connectedComponentsWithStats((label == value).astype(np.uint8), connectivity=8)
        comps[value] = comp
        parts += [(int(stats[j, cv2.CC_STAT_AREA]), value, j) for j in range(1, len(stats))]
    if len(comps) > MAX_OBJECTS:
        raise ValueError(f"{len(comps)} label values in one image: more than SegmentationObject's {MAX_OBJECTS} "
                         "object indices")
    parts.sort(key=lambda p: -p[0])  # stable: label order, then scan order among equal areas
    rest_values, seen = [0] * (len(parts) + 1), set()  # rest_values[k]: the label values among parts[k:]
    for k in range(len(parts) - 1, -1, -1):
        seen.add(parts[k][1])
        rest_values[k] = len(seen)
    # components with an index of their own: as many as leave one index for each value's rest
    keep = next(k for k in range(min(len(parts), MAX_OBJECTS), -1, -1) if k + rest_values[k] <= MAX_OBJECTS)
    own = parts[:keep]
    luts = {value: np.zeros(int(comp.max()) + 1, np.uint8) for value, comp in comps.items()}
    for index, (_, value, j) in enumerate(own, start=1):
        luts[value][j] = index
    index = len(own)
    for value in comps:  # what is left of each value: one object
        rest = luts[value][1:] == 0
        if rest.any():
            index += 1
            luts[value][1:][rest] = index
    objects = np.zeros(label.shape, np.uint8)
    for value, comp in comps.items():
        where = label == value
        objects[where] = luts[value][comp[where]]
    return objects


def _png(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    im = Image.fromarray(array, mode="P" if palette else None)
    if palette:
        im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_cvat(out_dir: Path, items: Iterable[tuple[str, Path, np.ndarray]], class_names: Sequence[str],
               background: bool, images: str = "copy") -> int:
    """Write ``items`` (image id, image file of the label map's size, label map HxW uint8 in the label index space
    of ``class_names``, 255 = ignore) to ``out_dir`` in CVAT's Segmentation mask 1.1 layout; ``class_names`` is
    label index -> name, ``background`` whether index 0 is the background. ``images``: ``copy`` or ``link``.
    Returns the number of images."""
    out_dir = Path(out_dir)
    lut = _lut(class_names, background)
    palette = voc_palette()
    ids = []
    for image_id, image, label in items:
        if label.ndim != 2 or label.dtype != np.uint8:
            raise ValueError(f"{image_id}: a label map is HxW uint8, got {label.dtype} {label.shape}")
        unknown = sorted(set(np.unique(label).tolist()) - set(range(len(class_names))) - {IGNORE})
        if unknown:
            raise ValueError(f"{image_id}: label values {unknown} have no name among {len(class_names)} labels")
        place_image(Path(image), out_dir / "JPEGImages" / f"{image_id}.jpg", images)
        atomic_write_bytes(out_dir / "SegmentationClass" / f"{image_id}.png", _png(lut[label]))
        try:
            objects = object_map(label, background)
        except ValueError as exc:
            raise ValueError(f"{image_id}: {exc}") from None
        atomic_write_bytes(out_dir / "SegmentationObject" / f"{image_id}.png", _png(objects, palette))
        ids.append(image_id)
    colours = label_colours(class_names, background)
    write_text(out_dir / "labelmap.txt", "# label:color_rgb:parts:actions\n"
               + "".join(f"{name}:{r},{g},{b}::\n" for name, (r, g, b) in colours.items()))
    write_text(out_dir / "ImageSets" / "Segmentation" / "default.txt", "".join(f"{i}\n" for i in ids))
    return len(ids)


@register_format("cvat")
def write_cvat_format(source: ExportSource, out_dir: Path, final_dir: Path) -> dict[str, Any]:
    items = ((item.id, item.image, label) for item, label in source.labels("cvat"))
    return {"images": write_cvat(out_dir, items, source.label_names, source.background, source.images)}
