"""Datasets: the synthetic generator, the PASCAL VOC, folder+CSV and COCO readers, and the training transforms."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, DataConfig
from pipeline.data.coco import annotations_file, read_coco
from pipeline.data.dataset import IGNORE, Sample, SegDataset, check_mask_sizes, read_image, read_mask, spread
from pipeline.data.folder import read_folder
from pipeline.data.folder import split_file as folder_split_file
from pipeline.data.synthetic import SPLITS, generate
from pipeline.data.voc import read_voc
from pipeline.data.voc import split_file as voc_split_file

__all__ = ["IGNORE", "Sample", "SegDataset", "check_mask_sizes", "load_dataset", "maps_dataset", "prepare_data",
           "read_image", "read_mask", "split_file", "spread"]

READERS = {"voc": read_voc, "synthetic": read_voc, "folder": read_folder}


def prepare_data(cfg: DataConfig) -> None:
    """Generate the synthetic dataset on first use; real datasets are read where they are."""
    if cfg.kind == "synthetic":
        s = cfg.synthetic
        generate(Path(cfg.root), n_train=s.n_train, n_val=s.n_val, size=s.size, seed=s.seed)


def load_dataset(cfg: DataConfig, split: str) -> SegDataset:
    prepare_data(cfg)
    if cfg.kind == "folder":  # without a val split (val_split: ""), nothing is held out
        return read_folder(Path(cfg.root), split, cfg.background, val_fraction=cfg.val_fraction if cfg.val_split else 0)
    if cfg.kind == "coco":
        c = cfg.coco
        return read_coco(Path(cfg.root), split, cfg.background, c.annotations, c.images, c.masks)
    return READERS[cfg.kind](Path(cfg.root), split, cfg.background)


def maps_dataset(cfg: Config) -> SegDataset:
    """The images that get maps, refined labels and pseudo-masks: ``maps.split``, or ``maps.limit`` of its
    images spread evenly over it (a split file is often sorted by class: its first images show few classes)."""
    ds = load_dataset(cfg.data, cfg.maps.split)
    ds.samples = spread(ds.samples, cfg.maps.limit)
    return ds


def split_file(cfg: DataConfig, split: str) -> Path | None:
    """The file that ``split`` is read from, which must exist before any stage reads it: the split's list of ids
    (voc, folder, synthetic) or its instances JSON (coco). None where no file need exist yet: a split that a folder
    dataset without ``splits/`` holds out by hash, or one the synthetic generator writes on first use."""
    root = Path(cfg.root)
    if cfg.kind == "synthetic":
        return None if split in SPLITS else voc_split_file(root, split)
    if cfg.kind == "folder":
        return folder_split_file(root, split)
    if cfg.kind == "coco":
        return annotations_file(root, split, cfg.coco.annotations)
    return voc_split_file(root, split)
