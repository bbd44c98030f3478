"""The review round trip's two commands (not stages: they run on request, between export and a rerun):
``wsss review`` (the least-confident exported masks as a CVAT package and a worklist) and ``wsss import-masks``
(corrected masks back into ``<run>/corrections/``, which the next export takes); see ``pipeline/review.py``."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.data import maps_dataset
from pipeline.review import CORRECTIONS, WORKLIST, import_masks, write_review
from stages.common import log

DEFAULT_LIMIT = 20  # images in a review package when --limit is not given


def review(cfg: Config, limit: int | None, out: str | None) -> None:
    run_dir = cfg.run_path
    target = Path(out) if out else run_dir / "review"
    ds = maps_dataset(cfg)
    ids = write_review(run_dir, ds, DEFAULT_LIMIT if limit is None else limit, target)
    log.info("review: the %d least-confident of %d images in %s (CVAT Segmentation mask 1.1: import cvat.zip), "
             "in review order in %s", len(ids), len(ds), target / "cvat", target / WORKLIST)


def import_corrections(cfg: Config, folder: str) -> None:
    done = import_masks(cfg.run_path, maps_dataset(cfg), Path(folder))
    same = f"{len(done.unchanged)} unchanged (equal to the exported mask, not imported)"
    if done.corrected:
        log.info("import-masks: %d corrected masks in %s, %s; rerun from export (wsss all) to use them",
                 len(done.corrected), cfg.run_path / CORRECTIONS, same)
    else:
        log.info("import-masks: no mask differs from the exported one, %s: nothing to import", same)
