"""The export-format registry and what every format is written from, in a module of its own (as timm's
``_registry.py``): each format's module imports it to register its writer, and ``pipeline/formats/__init__.py``
imports those modules and hands the names on, so the imports point one way.

Every format is written from one :class:`ExportSource`: the images and label maps of the VOC export
(``pseudo_masks/``: upright JPEGs of the same size as their masks, palette PNGs in the dataset's label index space,
255 = ignore) and its label names. A writer is ``fn(source, out_dir, final_dir) -> dict`` (what it wrote, for the
log): it writes into ``out_dir``, a fresh folder that the caller renames to ``final_dir`` when the writer returns
(the path that files naming their own folder, as a YOLO ``data.yaml``, must give).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.errors import DataError, UserError
from pipeline.registry import Registry

IGNORE = 255  # the label maps' "uncertain / void" value (pipeline.data.dataset.IGNORE)


@dataclass(frozen=True)
class ExportItem:
    id: str
    image: Path  # an upright image of the label map's size (a JPEG in pseudo_masks/JPEGImages/)
    label: Path  # the label map: a palette or 8-bit gray PNG, label index space, 255 = ignore


@dataclass
class ExportSource:
    """The label maps every format is written from, and their label space."""

    label_names: list[str]  # label index -> name: with a background class, index 0 is "background"
    background: bool  # label index 0 is a background class (no object); else every index is a class
    items: list[ExportItem]
    images: str = "link"  # export.images: image files as symbolic links or copies
    manifest: dict[str, Any] = field(default_factory=dict)  # pseudo_masks/manifest.json, when there is one

    @property
    def classes(self) -> list[str]:
        """The object classes (no background), in label order: COCO categories and YOLO classes."""
        return self.label_names[int(self.background):]

    def class_of(self, label: int) -> int | None:
        """The object class index (0-based) of a label index; None for the background and the ignore value."""
        k = label - int(self.background)
        return k if 0 <= k < len(self.classes) else None

    def each(self, what: str) -> Iterator[ExportItem]:
        """Every item, under a progress bar named ``what``."""
        yield from tqdm(self.items, desc=f"export {what}", leave=False)

    def labels(self, what: str) -> Iterator[tuple[ExportItem, np.ndarray]]:
        """Every item with its label map (HxW uint8), read one at a time, under a progress bar named ``what``."""
        for item in self.each(what):
            yield item, read_label(item.label)


def read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: label map must be a palette or 8-bit gray PNG, got mode {im.mode}")
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: label map not found") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable label map ({exc})") from None


def voc_source(voc_dir: Path, split: str = "train", images: str = "link") -> ExportSource:
    """The source of a VOC-layout folder: ``pseudo_masks/`` (label names from its manifest.json) or any VOC-layout
    dataset with ``classes.txt`` and a background flag in its manifest (default: a background class, as VOC)."""
    voc_dir = Path(voc_dir)
    manifest_path = voc_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    if "classes" in manifest:
        classes, background = list(manifest["classes"]), bool(manifest["background"])
    else:
        names = [n.strip() for n in (voc_dir / "classes.txt").read_text(encoding="utf-8").splitlines() if n.strip()]
        background = names[:1] == ["background"] or manifest.get("background", True)
        classes = [n for n in names if n != "background"]
    split_file = voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.exists():
        raise DataError(f"{split_file}: split file not found")
    items = []
    for i in (line.strip() for line in split_file.read_text(encoding="utf-8").splitlines()):  # ids may hold spaces
        if not i:
            continue
        image = voc_dir / "JPEGImages" / f"{i}.jpg"
        if not image.exists():
            raise DataError(f"{image}: image not found")
        items.append(ExportItem(i, image, voc_dir / "SegmentationClass" / f"{i}.png"))
    return ExportSource((["background"] if background else []) + classes, background, items, images, manifest)


FormatWriter = Callable[[ExportSource, Path, Path], dict[str, Any]]
FORMATS: Registry[FormatWriter] = Registry("export format", "export.formats")
register_format = FORMATS.register


def place_image(src: Path, dst: Path, how: str) -> None:
    """``dst`` as a symbolic link to the file ``src`` resolves to (``link``), or a copy of it (``copy``)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if how == "copy":
        shutil.copyfile(src, dst)
        return
    try:
        os.symlink(Path(src).resolve(), dst)
    except OSError as exc:
        raise UserError(f"{dst.parent}: cannot make symbolic links here ({exc.strerror}); "
                        "set export.images: copy") from None


def components(label: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(label index, boolean mask) of each 8-connected component of each label value but the ignore value, in
    label order and then in OpenCV's scan order (top to bottom, left to right, of each component's first pixel)."""
    for value in np.unique(label):
        if value == IGNORE:
            continue
        n, comp = cv2.connectedComponents((label == value).astype(np.uint8), connectivity=8)
        for j in range(1, n):
            yield int(value), comp == j
