"""What every stage shares: the logger and the fingerprints of a dataset split's inputs."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.data import SegDataset
from pipeline.runfolder import files_fingerprint, fingerprint

log = logging.getLogger("stages")


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
