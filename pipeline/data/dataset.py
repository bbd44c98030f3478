"""The dataset model shared by every reader: samples with image-level labels and optional GT masks.

Label index space (used by GT masks, refined label maps and exported pseudo-masks alike):
- with a background class: 0 = background, k = ``classes[k - 1]`` for k = 1..C;
- without one (e.g. MSRC-21): k = ``classes[k]`` for k = 0..C-1.
255 is always "void / ignore". Image-level labels (``Sample.labels``) are foreground class indices
0..C-1 in both cases; :meth:`SegDataset.label_of` converts one to the label index space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import DataError

IGNORE = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    id: str
    image_path: Path
    labels: tuple[int, ...]  # foreground class indices, sorted
    mask_path: Path | None = None


@dataclass
class SegDataset:
    root: Path
    classes: list[str]  # foreground classes only
    background: bool
    samples: list[Sample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # ids without any label

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_labels(self) -> int:
        """Size of the label index space (masks), background included."""
        return self.num_classes + int(self.background)

    @property
    def label_names(self) -> list[str]:
        return (["background"] if self.background else []) + list(self.classes)

    def label_of(self, cls: int) -> int:
        return cls + int(self.background)

    def labels_vector(self, sample: Sample) -> np.ndarray:
        vec = np.zeros(self.num_classes, dtype=np.float32)
        vec[list(sample.labels)] = 1.0
        return vec

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)


def read_image(path: Path) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB: EXIF rotation applied; gray, RGBA, palette, 16-bit converted."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = (arr / max(arr.max(), 1.0) * 255.0).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def read_mask(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label mask (palette or gray PNG) as HxW uint8 indices; check its size against ``shape``."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: mask must be a palette or 8-bit gray PNG, got mode {im.mode}")
            mask = np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable mask ({exc})") from None
    if shape is not None and mask.shape != tuple(shape):
        raise DataError(f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                        f"{shape[1]}x{shape[0]}")
    return mask


def find_image(folder: Path, stem: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.exists():
                return cand
    raise DataError(f"{folder / stem}.*: no image with this id (looked for {', '.join(IMAGE_EXTENSIONS)})")


def read_classes(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"{path}: classes file not found (one class name per line)")
    classes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if classes and classes[0].lower() == "background":
        classes = classes[1:]
    if not classes:
        raise DataError(f"{path}: no class names in it")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate class names {dupes}")
    return classes


def read_labels_csv(path: Path, classes: list[str]) -> dict[str, tuple[int, ...]]:
    """``image,labels`` with space-separated class names -> {image id: sorted class indices}."""
    import csv

    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, tuple[int, ...]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["image", "labels"]:
            raise DataError(f"{path}: expected the header 'image,labels', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row or not row[0].strip():
                continue
            image = Path(row[0].strip()).stem
            names = row[1].split() if len(row) > 1 else []
            unknown = [n for n in names if n not in index]
            if unknown:
                raise DataError(f"{path}:{lineno}: unknown class {unknown[0]!r} for image {image!r} "
                                f"(classes.txt has {len(classes)} classes)")
            if image in out:
                raise DataError(f"{path}:{lineno}: duplicate image id {image!r}")
            out[image] = tuple(sorted({index[n] for n in names}))
    return out


def labels_from_mask(mask: np.ndarray, num_classes: int, background: bool) -> tuple[int, ...]:
    values = np.unique(mask)
    offset = int(background)
    return tuple(int(v) - offset for v in values if offset <= v < num_classes + offset)


def read_split(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"{path}: split file not found")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: the split is empty")
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise DataError(f"{path}: duplicate image id {i!r}")
        seen.add(i)
    return ids


def build_samples(root: Path, classes: list[str], background: bool, ids: list[str], images: dict[str, Path],
                  labels: dict[str, tuple[int, ...]], masks: dict[str, Path], source: Path) -> SegDataset:
    """Assemble a dataset; images without labels are skipped with a warning and listed in ``skipped``."""
    import logging

    ds = SegDataset(root=root, classes=classes, background=background)
    for i in ids:
        if i not in labels:
            raise DataError(f"{source}: no row for image {i!r}")
        if not labels[i]:
            ds.skipped.append(i)
            continue
        ds.samples.append(Sample(id=i, image_path=images[i], labels=labels[i], mask_path=masks.get(i)))
    if ds.skipped:
        logging.getLogger(__name__).warning("%s: %d image(s) without labels skipped (e.g. %s)", source,
                                            len(ds.skipped), ds.skipped[0])
    if not ds.samples:
        raise DataError(f"{source}: no labelled image in this split")
    return ds
