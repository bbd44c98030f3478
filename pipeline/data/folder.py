"""Folder + CSV reader: images/, optional masks/, labels.csv (image,labels), classes.txt.

Splits: ``splits/<split>.txt`` (one image id per line) when present; without it the ``train`` split is
every image listed in labels.csv and there is no other split.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.dataset import (
    SegDataset,
    build_samples,
    find_image,
    read_classes,
    read_labels_csv,
    read_split,
)
from pipeline.errors import DataError


def read_folder(root: Path, split: str, background: bool) -> SegDataset:
    root = Path(root)
    if not (root / "images").is_dir():
        raise DataError(f"{root / 'images'}: folder not found (expected images/, labels.csv, classes.txt)")
    classes = read_classes(root / "classes.txt")
    if not (root / "labels.csv").exists():
        raise DataError(f"{root / 'labels.csv'}: not found (header 'image,labels', labels space-separated)")
    labels = read_labels_csv(root / "labels.csv", classes)
    split_file = root / "splits" / f"{split}.txt"
    if split_file.exists():
        ids = read_split(split_file)
    elif split == "train":
        ids = list(labels)
    else:
        raise DataError(f"{split_file}: split file not found (without splits/, only 'train' = all images exists)")
    images = {i: find_image(root / "images", i) for i in ids}
    masks = {i: root / "masks" / f"{i}.png" for i in ids if (root / "masks" / f"{i}.png").exists()}
    return build_samples(root, classes, background, ids, images, labels, masks, source=root / "labels.csv")
