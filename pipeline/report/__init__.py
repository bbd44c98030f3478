"""report.html: one self-contained page of a run (no external resource: CSS inline, images as data: URIs).

Sections: the dataset and the classifier (val mAP, training curves); methods x mIoU x faithfulness;
pseudo-masks and baselines; the segmenter when metrics.json has one; per-class IoU; the threshold-sweep
and deletion/insertion curves; sample grids (image | each method's map | each refiner's mask | GT); the
class model visualisations; time per stage. See ``pipeline.report.build``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.report.build import build_report

__all__ = ["build_report", "report_path"]


def report_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "report.html"
