"""COCO instances reader (``data.kind: coco``): an image folder and an instances JSON per split.

Paths come from ``data.coco`` (relative to ``data.root``, ``{split}`` standing for the split's name):
``annotations`` (default ``annotations/instances_{split}.json``), ``images`` (default ``{split}``, the folder the
entries' ``file_name`` are relative to) and ``masks`` (default ``masks/{split}``, where the GT masks are written).

- Classes: the ``categories``, by ascending id, mapped to contiguous indices (category ids may have gaps, as
  COCO's 1..90 for 80 classes); a class's name is its category's ``name``.
- Image-level labels: the categories of an image's annotations, crowd ones included (the class is there).
  An image without annotations has no label and is skipped, as in every layout.
- GT masks, rasterised from the annotations once and kept as palette PNGs in ``data.coco.masks`` (rewritten when
  the JSON or ``data.background`` changes): polygons and RLE (compressed or not) painted largest first, so a
  smaller object lying on a larger one stays visible; crowd regions painted last as 255 (ignore). Unannotated
  pixels are the background (``data.background: true``) or 255 (``false``: no index means "nothing").
- An image's id (run folder names) is its ``file_name``'s stem, unique in the split.

Files as users have them are read as detectron2 and mmdet read them: a file of boxes without ``segmentation`` (or
with ``segmentation: []``), a degenerate polygon, an RLE of the wrong size or an unknown ``category_id`` among
thousands of good annotations still gives every image its image-level labels, which is all the classifier needs.
An annotation of an unknown category gives no label, one of an unknown ``image_id`` is skipped. GT masks are
written only for the images each of whose annotations has a sound segmentation of a known category; the others
have no ``mask_path`` (evaluate scores the images with GT masks only), and one warning line counts them and the
annotations at fault, with an example of each fault. What makes the file unusable as a whole (not JSON, no
``images``/``annotations``/``categories`` list, a category or image entry without its keys, an image that is not
in the image folder, two images or categories that share a name) ends with one ``DataError`` naming the file and
the entry.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import polygon

from pipeline.data.dataset import IGNORE, SegDataset, build_samples
from pipeline.errors import DataError
from pipeline.rle import decode_rle
from pipeline.runfolder import atomic_dir, files_fingerprint, read_json, save_label_png, write_json

log = logging.getLogger(__name__)
MASKS_MARKER = ".source.json"  # in the masks folder: what the masks were rasterised from


def _path(root: Path, template: str, split: str) -> Path:
    p = Path(template.replace("{split}", split))
    return p if p.is_absolute() else Path(root) / p


def annotations_file(root: Path, split: str, annotations: str = "annotations/instances_{split}.json") -> Path:
    """The instances JSON of ``split`` (``annotations``: ``data.coco.annotations``)."""
    return _path(root, annotations, split)


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise DataError(f"{path}: COCO annotations file not found (data.coco.annotations)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a valid JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO instances object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no '{key}' list (a COCO instances file has images, annotations, categories)")
    return data


def _entry(path: Path, what: str, entry: Any, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
    if missing:
        ident = f" {entry.get('id')}" if isinstance(entry, dict) and "id" in entry else ""
        raise DataError(f"{path}: {what}{ident} has no '{missing[0]}'")


def _check_segmentation(seg: Any, height: int, width: int) -> str | None:
    """Why ``seg`` is not a valid COCO segmentation of an image of that size, or None. (A missing one, ``None`` or
    ``[]``, is told apart by the caller: boxes-only files are common and not malformed.)"""
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or not all(isinstance(v, int | float) for v in poly):
                return "a polygon that is not a list of numbers"
            if len(poly) < 6 or len(poly) % 2:
                return f"a polygon of {len(poly)} numbers (x, y pairs, at least 3 points)"
        return None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if not isinstance(seg["size"], list) or seg["size"] != [height, width]:
            return f"an RLE of size {seg['size']} on an image of {height}x{width} (size is [height, width])"
        try:
            decode_rle(seg)
        except (ValueError, TypeError) as exc:
            return f"an invalid RLE ({exc})"
        return None
    return "neither polygons nor an RLE with counts and size"


def rasterise(anns: list[dict[str, Any]], height: int, width: int, index: dict[int, int], background: bool
              ) -> np.ndarray:
    """The label map of one image's annotations (``index``: category id -> label index)."""
    def mask_of(ann: dict[str, Any]) -> np.ndarray:
        seg = ann["segmentation"]
        if isinstance(seg, dict):
            return decode_rle(seg)
        # a pixel is inside when its centre is: COCO coordinates are continuous, pixel (0, 0) covering [0, 1)^2,
        # and skimage's polygon puts pixel centres on integers (pycocotools' own rasteriser agrees on rectangles)
        canvas = np.zeros((height, width), bool)
        for poly in seg:
            xy = np.asarray(poly, float).reshape(-1, 2) - 0.5
            rr, cc = polygon(xy[:, 1], xy[:, 0], (height, width))
            canvas[rr, cc] = True
        return canvas

    label = np.full((height, width), 0 if background else IGNORE, np.uint8)
    masks = [(mask_of(a), a) for a in anns]
    for m, a in sorted((x for x in masks if not x[1].get("iscrowd")), key=lambda x: -int(x[0].sum())):
        label[m] = index[a["category_id"]]
    for m, a in masks:
        if a.get("iscrowd"):
            label[m] = IGNORE
    return label


def read_coco(root: Path, split: str, background: bool, annotations: str = "annotations/instances_{split}.json",
              images: str = "{split}", masks: str = "masks/{split}") -> SegDataset:
    root = Path(root)
    path = annotations_file(root, split, annotations)
    data = _load(path)
    image_dir, mask_dir = _path(root, images, split), _path(root, masks, split)

    cats = data["categories"]
    for c in cats:
        _entry(path, "category", c, ("id", "name"))
    cats = sorted(cats, key=lambda c: c["id"])
    classes = [str(c["name"]) for c in cats]
    for key, values in (("id", [c["id"] for c in cats]), ("name", classes)):
        dupes = sorted({str(v) for v in values if values.count(v) > 1})
        if dupes:
            raise DataError(f"{path}: categories share the {key} {dupes[0]}")
    if not classes:
        raise DataError(f"{path}: no categories")
    index = {c["id"]: k + int(background) for k, c in enumerate(cats)}

    entries: dict[Any, dict[str, Any]] = {}
    ids: list[str] = []
    files: dict[str, Path] = {}
    for im in data["images"]:
        _entry(path, "image", im, ("id", "file_name", "height", "width"))
        sid = Path(str(im["file_name"])).stem
        file = image_dir / str(im["file_name"])
        if not file.exists():
            raise DataError(f"{path}: image {im['id']} ({im['file_name']}): {file} not found (data.coco.images)")
        if sid in files:
            raise DataError(f"{path}: image {im['id']} ({im['file_name']}): another image has the id {sid!r}")
        entries[im["id"]] = im
        ids.append(sid)
        files[sid] = file
    by_image: dict[Any, list[dict[str, Any]]] = {k: [] for k in entries}  # the annotations of known categories
    faults = _Faults()
    unsound: set[Any] = set()  # images with an annotation that cannot be painted: no GT mask
    for n, ann in enumerate(data["annotations"]):
        ann = ann if isinstance(ann, dict) else {}
        name = f"annotation {ann['id']}" if "id" in ann else f"annotation #{n + 1}"
        image_id = ann.get("image_id")
        if not isinstance(image_id, int | str) or image_id not in entries:
            faults.add("of an image_id not among the images, skipped", f"{name}: image_id {image_id!r}")
            continue
        category = ann.get("category_id")
        if not isinstance(category, int | str) or category not in index:
            faults.add("of a category_id not among the categories", f"{name}: category_id {category!r}")
            unsound.add(image_id)
            continue
        by_image[image_id].append(ann)
        seg = ann.get("segmentation")
        if seg is None or seg == []:
            faults.add("without a segmentation", name)
            unsound.add(image_id)
            continue
        im = entries[image_id]
        why = _check_segmentation(seg, int(im["height"]), int(im["width"]))
        if why:
            faults.add("with a malformed segmentation", f"{name}: {why}")
            unsound.add(image_id)
    sound = {k: anns for k, anns in by_image.items() if anns and k not in unsound}
    labelled = sum(1 for anns in by_image.values() if anns)
    if faults:
        unmasked = (f"{labelled - len(sound)} of {labelled} labelled images get no GT mask (evaluate scores only "
                    "those with one): ") if len(sound) < labelled else ""
        log.warning("%s: %s%s", path, unmasked, faults.describe())

    labels = {Path(str(entries[k]["file_name"])).stem: tuple(sorted({index[a["category_id"]] - int(background)
                                                                    for a in anns}))
              for k, anns in by_image.items()}
    mask_paths = _masks(path, mask_dir, entries, sound, index, background)
    return build_samples(root, classes, background, ids, files, labels, mask_paths, source=path)


def _masks(path: Path, mask_dir: Path, entries: dict[Any, dict[str, Any]], sound: dict[Any, list],
           index: dict[int, int], background: bool) -> dict[str, Path]:
    """The GT mask of every image of ``sound`` (image id -> its annotations, each with a sound segmentation),
    rasterised into ``mask_dir`` unless it holds those of this JSON; nothing is written when there is none."""
    stems = {k: Path(str(entries[k]["file_name"])).stem for k in sound}
    if not stems:
        return {}
    source = {"annotations": files_fingerprint([path]), "background": background}
    try:
        current = read_json(mask_dir / MASKS_MARKER) == source
    except (OSError, ValueError):
        current = False
    if not current:
        log.info("%s: rasterising the GT masks of %d images into %s", path, len(stems), mask_dir)
        try:
            with atomic_dir(mask_dir) as tmp:
                for k, stem in stems.items():
                    im = entries[k]
                    save_label_png(tmp / f"{stem}.png", rasterise(sound[k], int(im["height"]), int(im["width"]),
                                                                 index, background))
                write_json(tmp / MASKS_MARKER, source)
        except OSError as exc:
            raise DataError(f"{mask_dir}: cannot write the GT masks here ({exc.strerror or exc}); set "
                            "data.coco.masks to a folder that can be written") from None
    return {stem: mask_dir / f"{stem}.png" for stem in stems.values()}


class _Faults:
    """The annotations at fault, by fault: how many, and the first one (for the one warning line)."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.example: dict[str, str] = {}

    def add(self, fault: str, example: str) -> None:
        self.count[fault] = self.count.get(fault, 0) + 1
        self.example.setdefault(fault, example)

    def __bool__(self) -> bool:
        return bool(self.count)

    def describe(self) -> str:
        return "; ".join(f"{n} annotation{'s' * (n != 1)} {fault} (e.g. {self.example[fault]})"
                         for fault, n in self.count.items())
