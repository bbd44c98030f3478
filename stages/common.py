"""What every stage shares: the logger and the fingerprints of a dataset split's inputs."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Config
from pipeline.data import SegDataset, load_dataset, spread
from pipeline.runfolder import files_fingerprint, fingerprint

log = logging.getLogger("stages")


def maps_dataset(cfg: Config) -> SegDataset:
    """The images that get maps, refined labels and pseudo-masks: ``maps.split``, or ``maps.limit`` of its
    images spread evenly over it (a split file is often sorted by class: its first images show few classes)."""
    ds = load_dataset(cfg.data, cfg.maps.split)
    ds.samples = spread(ds.samples, cfg.maps.limit)
    return ds


def dataset_fingerprint(ds: SegDataset) -> str:
    """Classes, image-level labels and image files: what the classifier and the maps are made from."""
    return fingerprint(ds.classes, ds.background, [(s.id, s.labels) for s in ds.samples],
                       files_fingerprint(s.image_path for s in ds.samples))


def masks_fingerprint(ds: SegDataset) -> str:
    """The GT mask files, read only by evaluate: editing one re-runs evaluate and nothing else."""
    return files_fingerprint(s.mask_path for s in ds.samples if s.mask_path)


def weights_fingerprint(pretrained: str) -> str | None:
    """A local weights file (``classifier.pretrained: <path>``) is an input of train_classifier."""
    named = pretrained in ("none", "imagenet", "packaged")
    return files_fingerprint([pretrained]) if not named and Path(pretrained).is_file() else None
