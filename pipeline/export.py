"""Export refined label maps as a pseudo-mask dataset in PASCAL VOC layout, with a manifest, and the policy
of which refined label set is exported.

``pseudo_masks/`` holds JPEGImages/ (links or copies), SegmentationClass/ (palette PNGs in the source
dataset's label index space, 255 = ignore), ImageSets/Segmentation/train.txt, classes.txt, labels.csv
and manifest.json (per image: classes, coverage of each class, ignore ratio). It is a VOC-layout dataset
the readers take as it is, so a segmenter trains on pseudo-masks or on GT with the same code.

Which label set (``export.refiner``): one named, or with ``auto`` the first of ``AUTO_ORDER`` that ran, each
refiner on the affinity stage's walked maps (``<refiner>_rw``) before any on the raw maps.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.data import IGNORE, SegDataset, read_mask
from pipeline.errors import ConfigError, DataError, UserError
from pipeline.refine import DECOUPLED, SUFFIX
from pipeline.runfolder import atomic_dir, write_json, write_text

# export.refiner auto: the refiners best first, where they ran (docs/experiments.md: MSRC-21 and the synthetic
# set; sam only runs where a config names it, and measured better than graphcut on real photos only). A new
# refiner takes its place here; its walked label set (<name>_rw) ranks with the others' walked sets.
AUTO_ORDER = ["sam", "graphcut", "crf", "threshold"]


def auto_order() -> list[str]:
    """The label sets ``auto`` looks for, in order: the decoupled round's (pipeline/decouple.py; it runs only for
    classes bound to a context), then every refiner of ``AUTO_ORDER`` on the walked maps, then on the raw maps (a
    refiner on the walked maps beats the same refiner on the raw ones)."""
    suffixes = (DECOUPLED + SUFFIX, DECOUPLED, SUFFIX, "")
    return [r + suffix for suffix in suffixes for r in AUTO_ORDER]


def export_refiner(name: str, refined: list[str]) -> str:
    """The label set whose masks are exported, from ``refined`` (the sets the run made: ``label_sets``):
    ``name``, or with ``auto`` the first of ``auto_order()`` that ran, else the first that ran."""
    if name == "auto":
        ran = [r for r in auto_order() if r in refined] or refined
        if not ran:
            raise ConfigError("config key 'refine.refiners' is empty: there is nothing to export")
        return ran[0]
    if name not in refined:
        raise ConfigError(f"config key 'export.refiner': {name!r} is not among the refined label sets {refined} "
                          "(refine.refiners, and <refiner>_rw for affinity.refiners when affinity is on)")
    return name


def export_pseudo_masks(ds: SegDataset, refined_dir: Path, out_dir: Path, images: str = "link",
                        provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the dataset to ``out_dir`` (swapped into place at the end) and return its manifest."""
    names = ds.label_names
    manifest: dict[str, Any] = {"classes": ds.classes, "background": ds.background, **(provenance or {}),
                                "skipped_without_labels": len(ds.skipped), "images": {}}
    with atomic_dir(out_dir) as tmp:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
        for s in tqdm(ds.samples, desc="export", leave=False):
            src = refined_dir / f"{s.id}.png"
            label = _refined(src)
            shutil.copyfile(src, tmp / "SegmentationClass" / src.name)
            _place_image(s.image_path, tmp / "JPEGImages" / f"{s.id}{s.image_path.suffix.lower()}", images)
            counts = np.bincount(label.ravel(), minlength=256)
            n = label.size
            manifest["images"][s.id] = {
                "classes": [ds.classes[c] for c in s.labels],
                "coverage": {names[k]: round(float(counts[k] / n), 4) for k in range(len(names)) if counts[k]},
                "ignore_ratio": round(float(counts[IGNORE] / n), 4),
            }
        ids = [s.id for s in ds.samples]
        write_text(tmp / "ImageSets/Segmentation/train.txt", "\n".join(ids) + "\n")
        write_text(tmp / "classes.txt", "\n".join(ds.classes) + "\n")
        rows = [f"{s.id},{' '.join(ds.classes[c] for c in s.labels)}" for s in ds.samples]
        write_text(tmp / "labels.csv", "image,labels\n" + "\n".join(rows) + "\n")
        ratios = [v["ignore_ratio"] for v in manifest["images"].values()]
        manifest["summary"] = {"images": len(ids), "mean_ignore_ratio": round(float(np.mean(ratios)), 4)}
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _refined(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: refined label map not found (run the refine stage)")
    return read_mask(path)


def _place_image(src: Path, dst: Path, images: str) -> None:
    if images == "copy":
        shutil.copyfile(src, dst)
        return
    try:
        os.symlink(src.resolve(), dst)
    except OSError as exc:
        raise UserError(f"{dst.parent}: cannot make symbolic links here ({exc.strerror}); "
                        "set export.images: copy") from None
