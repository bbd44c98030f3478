"""The review round trip: the least-confident pseudo-masks out to an annotation tool, the corrected masks back in.

``wsss review`` writes the N images of the export's manifest with the lowest confidence (``pipeline.confidence``)
as a CVAT "Segmentation mask 1.1" package (``pipeline.formats.write_cvat``: ``cvat/`` and the same as ``cvat.zip``,
which CVAT's import takes) and ``worklist.csv``, the images in review order with their confidence and weakest class.

``wsss import-masks <folder>`` reads corrected masks back: the ``SegmentationClass/`` of an export from CVAT (RGB, in
the colours of the folder's ``labelmap.txt``, or of the package's when the folder has none), or a folder of label
PNGs (palette or 8-bit gray: label indices, 255 = ignore). Every file is checked before anything is written: its
name is an image of the run, its size is the upright image's, every value is a class of the dataset, background or
255. Then ``corrections/`` is rebuilt under a temp name (the earlier corrections and the new ones) and swapped into
place, so an import is whole or nothing. Corrections are an input of the export stage (:func:`corrections_fingerprint`
is part of its fingerprint): rerunning makes export, the segmenter and evaluate stale, and nothing before them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.confidence import read_confidence, review_order
from pipeline.data import IGNORE, SegDataset
from pipeline.errors import DataError, UserError
from pipeline.runfolder import atomic_dir, atomic_write_bytes, save_label_png

CORRECTIONS = "corrections"  # <run>/corrections/<id>.png: masks a person corrected
WORKLIST = "worklist.csv"


def corrections_fingerprint(run_dir: Path) -> str | None:
    """A digest of the contents of ``<run>/corrections/`` (None when it holds no mask): an input of export."""
    files = sorted((Path(run_dir) / CORRECTIONS).glob("*.png"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- review


def write_review(run_dir: Path, ds: SegDataset, limit: int, out: Path) -> list[str]:
    """The ``limit`` least-confident exported images (all of them when fewer) as a CVAT package in ``out/cvat/``
    (and ``out/cvat.zip``) and ``out/worklist.csv``; returns their ids in review order."""
    from pipeline.data import read_mask
    from pipeline.formats import write_cvat

    voc = Path(run_dir) / "pseudo_masks"
    manifest = read_confidence(run_dir)
    if manifest is None:
        raise UserError(f"{voc / 'manifest.json'}: no exported pseudo-masks in this run (run the export stage first)")
    if limit < 1:
        raise UserError(f"--limit {limit}: give a number of images of at least 1")
    order = review_order(manifest)[:limit]
    if order and all(manifest["images"][i].get("confidence") is None for i in order):
        raise UserError(f"{voc / 'manifest.json'}: has no confidence (exported by an older version: rerun the export "
                        "stage with --force)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = ((i, voc / "JPEGImages" / f"{i}.jpg", read_mask(voc / "SegmentationClass" / f"{i}.png")) for i in order)
    with atomic_dir(out / "cvat") as tmp:
        write_cvat(tmp, items, ds.label_names, ds.background, images="copy")
    zip_tmp = shutil.make_archive(str(out / ".cvat.zip"), "zip", out / "cvat")
    Path(zip_tmp).replace(out / "cvat.zip")
    rows = []
    for rank, i in enumerate(order, start=1):
        entry = manifest["images"][i]
        classes = entry.get("class_confidence") or {}
        weakest = min(classes, key=lambda c: classes[c]["confidence"]) if classes else ""
        rows.append([rank, i, entry.get("confidence"), weakest,
                     classes[weakest]["confidence"] if weakest else "", " ".join(entry.get("classes", []))])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "image", "confidence", "weakest_class", "weakest_class_confidence", "classes"])
    writer.writerows(rows)
    atomic_write_bytes(out / WORKLIST, buf.getvalue().encode())
    return order


# --------------------------------------------------------------------------------------------------- import


def _labelmap(path: Path) -> dict[tuple[int, int, int], str]:
    """CVAT's labelmap.txt (``name:r,g,b:parts:actions``) -> colour -> label name."""
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(":")
        try:
            rgb = tuple(int(v) for v in parts[1].split(","))
            if len(rgb) != 3:
                raise ValueError
        except (IndexError, ValueError):
            raise DataError(f"{path}: line {n} is not 'name:r,g,b::' ({line.strip()!r})") from None
        out[rgb] = parts[0]
    return out


def _colour_table(folder: Path, ds: SegDataset) -> dict[tuple[int, int, int], int]:
    """RGB colour -> label index, from the folder's labelmap.txt (by label name) or else the package's colours. The
    background label of a dataset without a background class (CVAT's unpainted pixels) means ignore."""
    from pipeline.formats.cvat import IGNORE_LABEL, label_colours

    index = {name: k for k, name in enumerate(ds.label_names)} | {IGNORE_LABEL: IGNORE}
    if not ds.background:
        index.setdefault("background", IGNORE)
    labelmap = folder / "labelmap.txt"
    if labelmap.is_file():
        named = _labelmap(labelmap)
        unknown = sorted(set(named.values()) - set(index))
        if unknown:
            raise DataError(f"{labelmap}: labels {unknown} are not classes of the dataset "
                            f"({', '.join(ds.label_names)})")
    else:
        named = {rgb: name for name, rgb in label_colours(ds.label_names, ds.background).items()}
    return {rgb: index[name] for rgb, name in named.items()}


def _read_correction(path: Path, colours: Callable[[], dict[tuple[int, int, int], int]], where: str) -> np.ndarray:
    """A corrected mask as label indices [H,W] uint8: a palette or gray PNG as it is, an RGB one through the table
    ``colours()`` (``_colour_table``, made on first use); ``where`` names that table in errors."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L"):
                return np.asarray(im, dtype=np.uint8).copy()
            if mode not in ("RGB", "RGBA"):
                raise DataError(f"{path}: a corrected mask is a palette, 8-bit gray or RGB PNG, got mode {mode}")
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable mask ({exc})") from None
    table = colours()
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in table], np.int32)
    values = np.array(list(table.values()), np.uint8)
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], code), 0, len(keys) - 1)
    known = keys[order][pos] == code
    if not known.all():
        y, x = np.argwhere(~known)[0]
        raise DataError(f"{path}: colour {tuple(int(v) for v in rgb[y, x])} at x={x}, y={y} is no label of {where}")
    return values[order][pos]


def mask_files(folder: Path) -> list[Path]:
    """The PNGs of ``folder/SegmentationClass/`` (an export from CVAT), else of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of corrected masks")
    sub = folder / "SegmentationClass"
    files = sorted((sub if sub.is_dir() else folder).glob("*.png"))
    if not files:
        raise UserError(f"{folder}: no .png masks in it (nor in its SegmentationClass/)")
    return files


def import_masks(run_dir: Path, ds: SegDataset, folder: Path) -> list[str]:
    """Check every mask of ``folder`` (:func:`mask_files`), then put them into ``<run>/corrections/`` (whole or
    nothing); returns the image ids imported."""
    from pipeline.data.dataset import image_shape

    folder = Path(folder)
    samples = {s.id: s for s in ds.samples}
    allowed = set(range(ds.num_labels)) | {IGNORE}
    labelmap = folder / "labelmap.txt"
    where = str(labelmap) if labelmap.is_file() else "the review package's labelmap.txt"
    colours = functools.cache(lambda: _colour_table(folder, ds))
    masks = {}
    for path in mask_files(folder):
        s = samples.get(path.stem)
        if s is None:
            raise DataError(f"{path}: names no image of the run ({len(samples)} images, e.g. "
                            f"{next(iter(samples), '?')}.png)")
        mask = _read_correction(path, colours, where)
        shape = image_shape(s.image_path)
        if mask.shape != shape:
            raise DataError(f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from the upright image "
                            f"{s.image_path} ({shape[1]}x{shape[0]})")
        bad = sorted(set(np.unique(mask).tolist()) - allowed)
        if bad:
            raise DataError(f"{path}: values {bad} are no label of the dataset (0..{ds.num_labels - 1} "
                            f"{'with 0 = background' if ds.background else 'for its classes'}, 255 = ignore)")
        masks[path.stem] = mask
    target = Path(run_dir) / CORRECTIONS
    with atomic_dir(target) as tmp:
        if target.is_dir():
            for old in target.glob("*.png"):
                if old.stem not in masks:
                    shutil.copy2(old, tmp / old.name)
        for image_id, mask in masks.items():
            save_label_png(tmp / f"{image_id}.png", mask)
    return list(masks)
