"""PASCAL VOC layout reader: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt.

Image-level labels come from ``labels.csv`` (``image,labels``) when present, otherwise from the masks.
Class names come from ``classes.txt`` (foreground classes; a leading ``background`` line is dropped),
or default to the 20 PASCAL VOC classes.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.dataset import (
    SegDataset,
    build_samples,
    find_image,
    labels_from_mask,
    read_classes,
    read_labels_csv,
    read_mask,
    read_split,
)
from pipeline.errors import DataError

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def split_file(root: Path, split: str) -> Path:
    """The file that lists the image ids of ``split``."""
    return Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"


def read_voc(root: Path, split: str, background: bool) -> SegDataset:
    root = Path(root)
    if not (root / "JPEGImages").is_dir():
        raise DataError(f"{root / 'JPEGImages'}: folder not found (expected a PASCAL VOC layout dataset)")
    classes = read_classes(root / "classes.txt") if (root / "classes.txt").exists() else list(VOC_CLASSES)
    ids = read_split(split_file(root, split))
    mask_dir = root / "SegmentationClass"
    masks = {i: mask_dir / f"{i}.png" for i in ids if (mask_dir / f"{i}.png").exists()}
    if (root / "labels.csv").exists():
        labels = read_labels_csv(root / "labels.csv", classes)
    else:
        if len(masks) < len(ids):
            missing = next(i for i in ids if i not in masks)
            raise DataError(f"{root / 'labels.csv'}: not found, and {mask_dir / missing}.png is missing too: "
                            "image-level labels need one or the other")
        labels = {i: labels_from_mask(read_mask(masks[i]), len(classes), background) for i in ids}
    images = {i: find_image(root / "JPEGImages", i) for i in ids}
    return build_samples(root, classes, background, ids, images, labels, masks, source=root / "labels.csv")
