"""The review round trip: the least-confident pseudo-masks out to an annotation tool, the corrected masks back in.

``wsss review`` writes the N images of the export's manifest with the lowest confidence (``pipeline.confidence``)
as a CVAT "Segmentation mask 1.1" package (``pipeline.formats.write_cvat``: ``cvat/`` and the same as ``cvat.zip``,
which CVAT's import takes) and ``worklist.csv``, the images in review order with their confidence and weakest class.

``wsss import-masks <folder>`` reads corrected masks back: the ``SegmentationClass/`` of an export from CVAT (RGB, in
the colours of the folder's ``labelmap.txt``, or of the package's when the folder has none; an image its
``ImageSets/Segmentation/`` lists without a mask is all unpainted), or a folder of label PNGs (palette or 8-bit gray:
with a ``labelmap.txt`` index i is its i-th label, else a label index of the dataset; 255 = ignore). Every file is
checked before anything is written: its name is an image of the run, its size is the upright image's, every value
is a class of the dataset, background or 255. A mask equal to the exported one is no correction (a round trip
through CVAT without an edit imports nothing); the others go into ``corrections/``, rebuilt under a temp name (the
earlier corrections and the new ones) and swapped into place, so an import is whole or nothing. Corrections are an
input of the export stage (:func:`corrections_fingerprint` is part of its fingerprint): rerunning makes export, the
segmenter and evaluate stale, and nothing before them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.confidence import read_confidence, review_order
from pipeline.data import IGNORE, SegDataset, read_mask
from pipeline.data.dataset import image_shape
from pipeline.errors import DataError, UserError
from pipeline.formats import write_cvat
from pipeline.formats.cvat import IGNORE_LABEL, label_colours
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


@dataclass(frozen=True)
class MaskSource:
    """One corrected mask of a folder: ``path`` its PNG, or None for an image that a CVAT export lists (``listed``,
    its ``ImageSets/Segmentation/<subset>.txt``) without a mask: CVAT writes none for an image with no painted pixel."""
    id: str
    path: Path | None
    listed: Path | None = None


@dataclass(frozen=True)
class Imported:
    """What :func:`import_masks` did: the ids written into ``corrections/``, and the ids whose mask equals the
    exported one (not a correction: nothing written for them)."""
    corrected: list[str]
    unchanged: list[str]


def read_labelmap(path: Path) -> list[tuple[str, tuple[int, int, int] | None]]:
    """A labelmap.txt of CVAT or datumaro (``name:r,g,b:parts:actions``, ``#`` comments) -> (label name, colour or
    None when the line gives none), in the file's order."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(":")
        try:
            rgb = tuple(int(v) for v in parts[1].split(",")) if parts[1].strip() else None
            if rgb is not None and (len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb)):
                raise ValueError
        except (IndexError, ValueError):
            raise DataError(f"{path}: line {n} is not 'name:r,g,b::' ({line.strip()!r})") from None
        out.append((parts[0], rgb))
    return out


class _Decoder:
    """A folder's corrected masks -> label indices of the dataset (255 = ignore). With a ``labelmap.txt`` in the
    folder, its labels are matched to the dataset's by name: an RGB pixel by its label's colour, a palette or gray
    index i as the i-th label of the file (the order in which datumaro's VOC writer indexes masks without colours),
    and index 255, past the file's labels, as ignore. Without one, an RGB pixel goes by the review package's colours
    and an index is a label index of the dataset as it is. The background label of a dataset without a background
    class (CVAT's unpainted pixels) means ignore."""

    def __init__(self, folder: Path, ds: SegDataset) -> None:
        index = {name: k for k, name in enumerate(ds.label_names)} | {IGNORE_LABEL: IGNORE}
        if not ds.background:
            index.setdefault("background", IGNORE)
        self.unpainted = index["background"]  # an image CVAT exports without a mask
        self.labelmap = folder / "labelmap.txt"
        self.where = str(self.labelmap) if self.labelmap.is_file() else "the review package's labelmap.txt"
        if self.labelmap.is_file():
            labels = read_labelmap(self.labelmap)
            unknown = sorted({name for name, _ in labels} - set(index))
            if unknown:
                raise DataError(f"{self.labelmap}: labels {unknown} are not classes of the dataset "
                                f"({', '.join(ds.label_names)})")
            if len(labels) > 256:
                raise DataError(f"{self.labelmap}: {len(labels)} labels, more than an 8-bit mask can index")
            self.colours = {rgb: index[name] for name, rgb in labels if rgb is not None}
            self.positions = np.full(256, -1, np.int16)
            self.positions[:len(labels)] = [index[name] for name, _ in labels]
            if len(labels) <= IGNORE:
                self.positions[IGNORE] = IGNORE  # VOC's void, as tools write it
        else:
            self.colours = {rgb: index[name] for name, rgb in label_colours(ds.label_names, ds.background).items()}
            self.positions = None

    def read(self, path: Path) -> np.ndarray:
        """A corrected mask as label indices [H,W] uint8 (palette, 8-bit gray or RGB PNG); a value or colour that
        names no label ends in a ``DataError`` naming the file (raw indices are checked by the caller)."""
        try:
            with Image.open(path) as im:
                mode = im.mode
                if mode in ("P", "L"):
                    raw = np.asarray(im, dtype=np.uint8).copy()
                elif mode in ("RGB", "RGBA"):
                    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
                else:
                    raise DataError(f"{path}: a corrected mask is a palette, 8-bit gray or RGB PNG, got mode {mode}")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: unreadable mask ({exc})") from None
        if mode in ("P", "L"):
            if self.positions is None:
                return raw
            mask = self.positions[raw]
            bad = sorted(set(np.unique(raw[mask < 0]).tolist()))
            if bad:
                n = int((self.positions[:IGNORE] >= 0).sum())
                raise DataError(f"{path}: values {bad} are no label of {self.labelmap} (index i is its i-th label, "
                                f"{n} labels, 255 = ignore)")
            return mask.astype(np.uint8)
        return self._by_colour(path, rgb)

    def _by_colour(self, path: Path, rgb: np.ndarray) -> np.ndarray:
        table = self.colours
        code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        keys = np.array([(r << 16) | (g << 8) | b for r, g, b in table], np.int32)
        values = np.array(list(table.values()), np.uint8)
        order = np.argsort(keys)
        pos = np.clip(np.searchsorted(keys[order], code), 0, len(keys) - 1)
        known = keys[order][pos] == code
        if not known.all():
            y, x = np.argwhere(~known)[0]
            raise DataError(f"{path}: colour {tuple(int(v) for v in rgb[y, x])} at x={x}, y={y} is no label of "
                            f"{self.where}")
        return values[order][pos]


def mask_files(folder: Path) -> list[MaskSource]:
    """The masks of ``folder``: for an export from CVAT (a ``SegmentationClass/`` subfolder) its PNGs and the images
    that its ``ImageSets/Segmentation/*.txt`` list without one, else the PNGs of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of corrected masks")
    sub = folder / "SegmentationClass"
    files = {p.stem: MaskSource(p.stem, p) for p in sorted((sub if sub.is_dir() else folder).glob("*.png"))}
    if sub.is_dir():
        for listed in sorted((folder / "ImageSets" / "Segmentation").glob("*.txt")):
            for line in listed.read_text(encoding="utf-8").splitlines():
                image_id = line.strip().split(" ")[0]
                if image_id and not image_id.startswith("#") and image_id not in files:
                    files[image_id] = MaskSource(image_id, None, listed)
    if not files:
        raise UserError(f"{folder}: no .png masks in it (nor in its SegmentationClass/)")
    return sorted(files.values(), key=lambda m: m.id)


def import_masks(run_dir: Path, ds: SegDataset, folder: Path) -> Imported:
    """Check every mask of ``folder`` (:func:`mask_files`, decoded by :class:`_Decoder`), then put the ones that
    differ from the exported mask (``pseudo_masks/SegmentationClass/<id>.png``) into ``<run>/corrections/``, whole
    or nothing. A mask equal to the exported one is no correction: it is not written, and an earlier correction of
    the image stays. Nothing changes on disk when no mask differs."""
    folder = Path(folder)
    samples = {s.id: s for s in ds.samples}
    allowed = set(range(ds.num_labels)) | {IGNORE}
    decoder = None  # made on the first mask: a bad labelmap.txt is reported only when there is a mask to read
    exported = Path(run_dir) / "pseudo_masks" / "SegmentationClass"
    masks, unchanged = {}, []
    for source in mask_files(folder):
        where = source.path or source.listed
        s = samples.get(source.id)
        if s is None:
            named = where if source.path else f"{where}: {source.id}"
            raise DataError(f"{named}: names no image of the run ({len(samples)} images, e.g. "
                            f"{next(iter(samples), '?')}.png)")
        decoder = decoder or _Decoder(folder, ds)
        shape = image_shape(s.image_path)
        mask = np.full(shape, decoder.unpainted, np.uint8) if source.path is None else decoder.read(source.path)
        if mask.shape != shape:
            raise DataError(f"{where}: mask size {mask.shape[1]}x{mask.shape[0]} differs from the upright image "
                            f"{s.image_path} ({shape[1]}x{shape[0]})")
        bad = sorted(set(np.unique(mask).tolist()) - allowed)
        if bad:
            raise DataError(f"{where}: values {bad} are no label of the dataset (0..{ds.num_labels - 1} "
                            f"{'with 0 = background' if ds.background else 'for its classes'}, 255 = ignore)")
        reference = exported / f"{source.id}.png"
        if reference.is_file() and np.array_equal(read_mask(reference), mask):
            unchanged.append(source.id)
        else:
            masks[source.id] = mask
    if masks:
        target = Path(run_dir) / CORRECTIONS
        with atomic_dir(target) as tmp:
            if target.is_dir():
                for old in target.glob("*.png"):
                    if old.stem not in masks:
                        shutil.copy2(old, tmp / old.name)
            for image_id, mask in masks.items():
                save_label_png(tmp / f"{image_id}.png", mask)
    return Imported(corrected=list(masks), unchanged=unchanged)
