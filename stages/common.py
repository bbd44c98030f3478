"""What every stage shares: the logger and the fingerprint of a dataset split."""

from __future__ import annotations

import logging

from pipeline.data import SegDataset
from pipeline.runfolder import files_fingerprint, fingerprint

log = logging.getLogger("stages")


def dataset_fingerprint(ds: SegDataset) -> str:
    files = [s.image_path for s in ds.samples] + [s.mask_path for s in ds.samples if s.mask_path]
    return fingerprint(ds.classes, ds.background, [(s.id, s.labels) for s in ds.samples], files_fingerprint(files))
