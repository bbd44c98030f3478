"""Folder + CSV reader: images/, optional masks/, labels.csv (image,labels), classes.txt.

Splits: ``splits/<split>.txt`` (one image id per line) when present. Without ``splits/``, the images listed
in labels.csv are split by ``val_fraction`` (``data.val_fraction``): about that share of them, chosen by a hash
of their ids, is the ``val`` split and the rest is ``train``, so the hold-out is the same on every run and an
image keeps its side when others are added; ``all`` is every image.
"""

from __future__ import annotations

import hashlib
import logging
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

log = logging.getLogger(__name__)
HELD_OUT_SPLITS = ("train", "val", "all")  # the splits of a folder dataset without splits/


def held_out(ids: list[str], fraction: float) -> set[str]:
    """The ids of the validation hold-out: those whose id hashes to a number in [0, 1) below ``fraction``, so an
    image keeps its side when others are added; with two images or more, at least one is held out and one
    is kept (the lowest and the highest hash)."""
    if fraction <= 0 or len(ids) < 2:
        return set()
    u = {i: int(hashlib.sha256(f"val:{i}".encode()).hexdigest()[:15], 16) / 16**15 for i in ids}
    ranked = sorted(ids, key=u.__getitem__)
    val = {i for i in ids if u[i] < fraction} or {ranked[0]}
    return val - {ranked[-1]}


def split_file(root: Path, split: str) -> Path | None:
    """The file that lists the image ids of ``split``, ``splits/<split>.txt``; None where the split is held out by
    hash instead: ``train``, ``val`` and ``all`` (``HELD_OUT_SPLITS``) of a dataset without ``splits/``."""
    root = Path(root)
    if split in HELD_OUT_SPLITS and not (root / "splits").is_dir():
        return None
    return root / "splits" / f"{split}.txt"


def read_folder(root: Path, split: str, background: bool, val_fraction: float = 0.1) -> SegDataset:
    root = Path(root)
    if not (root / "images").is_dir():
        raise DataError(f"{root / 'images'}: folder not found (expected images/, labels.csv, classes.txt)")
    classes = read_classes(root / "classes.txt")
    if not (root / "labels.csv").exists():
        raise DataError(f"{root / 'labels.csv'}: not found (header 'image,labels', labels space-separated)")
    labels = read_labels_csv(root / "labels.csv", classes)
    listed = split_file(root, split)
    if listed is None:  # no splits/: the split is held out by a hash of the ids
        ids = list(labels)
        val = held_out([i for i in ids if labels[i]], val_fraction)
        if split == "val" and not val:
            raise DataError(f"{root / 'splits' / 'val.txt'}: split file not found, and data.val_fraction is "
                            f"{val_fraction:g}: no images are held out; raise data.val_fraction or set "
                            "data.val_split: \"\"")
        if split == "val":
            log.info("%s: no splits/, %d of %d images held out for validation (data.val_fraction %g): %s", root,
                     len(val), len(ids), val_fraction, ", ".join(sorted(val)))
        if split != "all":
            ids = [i for i in ids if (i in val) == (split == "val")]
    elif listed.exists():
        ids = read_split(listed)
    elif (root / "splits").is_dir():
        raise DataError(f"{listed}: split file not found")
    else:
        raise DataError(f"{listed}: split file not found (without splits/, the splits are 'train', 'val' "
                        f"(data.val_fraction of the images) and 'all')")
    images = {i: find_image(root / "images", i) for i in ids}
    masks = {i: root / "masks" / f"{i}.png" for i in ids if (root / "masks" / f"{i}.png").exists()}
    return build_samples(root, classes, background, ids, images, labels, masks, source=root / "labels.csv")
