"""Export refined label maps as a pseudo-mask dataset in PASCAL VOC layout, with a manifest, and the policy
of which refined label set is exported.

``pseudo_masks/`` holds JPEGImages/<id>.jpg, SegmentationClass/ (palette PNGs in the source
dataset's label index space, 255 = ignore), ImageSets/Segmentation/train.txt, classes.txt, labels.csv
and manifest.json (per image: classes, coverage of each class, ignore ratio). It is a VOC-layout dataset
the readers take as it is, so a segmenter trains on pseudo-masks or on GT with the same code.

Every image is ``JPEGImages/<id>.jpg``, upright and of its mask's size, because readers of the layout
(torchvision's ``VOCSegmentation``, mmseg's VOC config) open ``<id>.jpg`` and ignore EXIF orientation. A source
that is already such a file (a JPEG, RGB or gray, without an EXIF rotation) is linked or copied
(``export.images``); any other (a .png/.webp/.tif, an EXIF-rotated, CMYK, 16-bit or RGBA image) is written as
the RGB image the pipeline read (``pipeline.data.read_image``: rotated upright, alpha on white), as a JPEG of
quality ``JPEG_QUALITY`` without chroma subsampling.

The other formats (``export.formats``: ``pipeline.formats``) are written from this folder into
``exports/<format>/``, each swapped into place whole.

Which label set (``export.refiner``): one named, or with ``auto`` the first of ``AUTO_ORDER`` that ran, each
refiner on the affinity stage's walked maps (``<refiner>_rw``) before any on the raw maps.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.confidence import corrected, summarise
from pipeline.data import IGNORE, SegDataset, read_image, read_mask
from pipeline.data.dataset import EXIF_ORIENTATION
from pipeline.errors import ConfigError, DataError
from pipeline.formats import FORMATS, VOC, voc_source
from pipeline.formats._registry import place_image
from pipeline.refine import DECOUPLED, SUFFIX
from pipeline.runfolder import atomic_dir, read_json, write_json, write_text

# export.refiner auto: the refiners best first, where they ran (docs/experiments.md: MSRC-21 and the synthetic
# set; sam only runs where a config names it, and measured better than graphcut on real photos only). A new
# refiner takes its place here; its walked label set (<name>_rw) ranks with the others' walked sets.
AUTO_ORDER = ["sam", "graphcut", "crf", "threshold"]
JPEG_QUALITY = 95  # of the images written as JPEG (not linked): nearly lossless, about 3x a linked photo's size


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
                        provenance: dict[str, Any] | None = None, confidence: dict[str, dict] | None = None,
                        corrections: Path | None = None) -> dict[str, Any]:
    """Write the dataset to ``out_dir`` (swapped into place at the end) and return its manifest. ``confidence``:
    image id -> its confidence entry (``pipeline.confidence.image_confidence``), written into the manifest with
    ``confidence`` over the run (``summarise``); ``corrections``: a folder of masks a person corrected
    (``<id>.png``, ``wsss import-masks``), exported instead of the refined ones and marked ``corrected``."""
    names = ds.label_names
    manifest: dict[str, Any] = {"classes": ds.classes, "background": ds.background, **(provenance or {}),
                                "skipped_without_labels": len(ds.skipped), "images": {}}
    with atomic_dir(out_dir) as tmp:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
        for s in tqdm(ds.samples, desc="export", leave=False):
            fixed = Path(corrections) / f"{s.id}.png" if corrections is not None else None
            src = fixed if fixed is not None and fixed.is_file() else refined_dir / f"{s.id}.png"
            label = _refined(src)
            shutil.copyfile(src, tmp / "SegmentationClass" / f"{s.id}.png")
            _place_image(s.image_path, tmp / "JPEGImages" / f"{s.id}.jpg", label.shape, images)
            counts = np.bincount(label.ravel(), minlength=256)
            n = label.size
            manifest["images"][s.id] = {
                "classes": [ds.classes[c] for c in s.labels],
                "coverage": {names[k]: round(float(counts[k] / n), 4) for k in range(len(names)) if counts[k]},
                "ignore_ratio": round(float(counts[IGNORE] / n), 4),
            }
            if src == fixed:
                manifest["images"][s.id] |= corrected()
            elif confidence is not None and s.id in confidence:
                manifest["images"][s.id] |= confidence[s.id]
        ids = [s.id for s in ds.samples]
        write_text(tmp / "ImageSets/Segmentation/train.txt", "\n".join(ids) + "\n")
        write_text(tmp / "classes.txt", "\n".join(ds.classes) + "\n")
        rows = [f"{s.id},{' '.join(ds.classes[c] for c in s.labels)}" for s in ds.samples]
        write_text(tmp / "labels.csv", "image,labels\n" + "\n".join(rows) + "\n")
        ratios = [v["ignore_ratio"] for v in manifest["images"].values()]
        manifest["summary"] = {"images": len(ids), "mean_ignore_ratio": round(float(np.mean(ratios)), 4)}
        if confidence is not None or corrections is not None:
            manifest["confidence"] = summarise(manifest["images"], ds.classes)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _refined(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: refined label map not found (run the refine stage)")
    return read_mask(path)


def _linkable(src: Path) -> tuple[bool, tuple[int, int]]:
    """Whether ``src`` can be linked as a VOC image as it is (a baseline-readable RGB or gray JPEG without an EXIF
    rotation), and its size (height, width) as stored."""
    try:
        with Image.open(src) as im:
            rotated = im.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
            return im.format == "JPEG" and im.mode in ("RGB", "L") and not rotated, (im.height, im.width)
    except (OSError, SyntaxError, ValueError):
        return False, (0, 0)  # read_image names the file and the problem


def _place_image(src: Path, dst: Path, shape: tuple[int, int], images: str) -> None:
    """``dst`` (a .jpg) as the upright image of ``src``, of size ``shape`` (its label map's): a JPEG that is one
    already is placed as every export format places its images (``place_image``: a link, or a copy), any other is
    written as a JPEG from the pixels the pipeline read."""
    linkable, size = _linkable(src)
    if not linkable:
        rgb = read_image(src)
        size = rgb.shape[:2]
    if tuple(size) != tuple(shape):
        raise DataError(f"{src}: image size {size[1]}x{size[0]} differs from its refined label map "
                        f"{shape[1]}x{shape[0]} (rerun the refine stage with --force)")
    if linkable:
        place_image(src, dst, images)
    else:
        Image.fromarray(rgb).save(dst, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


FORMAT_MARKER = "export.json"  # in exports/<format>/: the fingerprint of the VOC export it was written from


def formats_to_write(exports_dir: Path, formats: list[str], fp: str, force: bool = False) -> list[str]:
    """The formats of ``formats`` (``voc`` aside) whose folder is missing or was written from another VOC export
    than the one of fingerprint ``fp`` (all of them with ``force``)."""
    todo = []
    for name in formats:
        marker = Path(exports_dir) / name / FORMAT_MARKER
        if name == VOC or name in todo:
            continue
        try:
            current = not force and read_json(marker).get("fingerprint") == fp
        except (OSError, ValueError):
            current = False
        if not current:
            todo.append(name)
    return todo


def write_formats(voc_dir: Path, exports_dir: Path, formats: list[str], images: str = "link",
                  fp: str | None = None) -> dict[str, dict]:
    """Write each format of ``formats`` but ``voc`` from the VOC export ``voc_dir`` into ``exports_dir/<format>/``
    (built under a temp name and swapped into place, with ``FORMAT_MARKER`` holding ``fp``); returns what each
    wrote."""
    if all(name == VOC for name in formats):
        return {}
    source = voc_source(voc_dir, images=images)
    out = {}
    for name in dict.fromkeys(formats):
        if name == VOC:
            continue
        writer = FORMATS.get(name)
        final = Path(exports_dir) / name
        with atomic_dir(final) as tmp:
            out[name] = writer(source, tmp, final)
            write_json(tmp / FORMAT_MARKER, {"format": name, "fingerprint": fp, **out[name]})
    return out
