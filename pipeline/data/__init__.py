"""Datasets: the synthetic generator, the PASCAL VOC, folder+CSV and COCO readers, and the training transforms."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, DataConfig
from pipeline.data.coco import read_coco
from pipeline.data.dataset import IGNORE, Sample, SegDataset, check_mask_sizes, read_image, read_mask, spread
from pipeline.data.folder import read_folder
from pipeline.data.voc import read_voc

__all__ = ["IGNORE", "Sample", "SegDataset", "check_mask_sizes", "load_dataset", "maps_dataset", "prepare_data",
           "read_image", "read_mask", "spread"]

READERS = {"voc": read_voc, "synthetic": read_voc, "folder": read_folder}


def prepare_data(cfg: DataConfig) -> None:
    """Generate the synthetic dataset on first use; real datasets are read where they are."""
    if cfg.kind == "synthetic":
        from pipeline.data.synthetic import generate

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
