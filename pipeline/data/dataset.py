"""The dataset model shared by every reader: samples with image-level labels and optional GT masks.

Label index space (used by GT masks, refined label maps and exported pseudo-masks alike):
- with a background class: 0 = background, k = ``classes[k - 1]`` for k = 1..C;
- without one (e.g. MSRC-21): k = ``classes[k]`` for k = 0..C-1.
255 is always "void / ignore". Image-level labels (``Sample.labels``) are foreground class indices
0..C-1 in both cases; :meth:`SegDataset.label_of` converts one to the label index space.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import DataError

IGNORE = 255
EXIF_ORIENTATION = 0x0112
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


@contextmanager
def _opened(path: Path, what: str) -> Iterator[Image.Image]:
    """``Image.open`` whose failures, while open too (a truncated file fails on decoding), name the file."""
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable {what} ({exc})") from None


def read_image(path: Path) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB: EXIF rotation applied; gray, RGBA, palette, 16-bit converted."""
    with _opened(path, "image") as im:
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


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of an image as :func:`read_image` returns it (EXIF rotation applied), from its header."""
    with _opened(path, "image") as im:
        w, h = im.size
        transposed = im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)  # rotated by 90 or 270 degrees
    return (w, h) if transposed else (h, w)


def _check_mask_shape(path: Path, mask_shape: tuple[int, int], image_shape: tuple[int, int]) -> None:
    if tuple(mask_shape) != tuple(image_shape):
        raise DataError(f"{path}: mask size {mask_shape[1]}x{mask_shape[0]} differs from its image "
                        f"{image_shape[1]}x{image_shape[0]}")


def read_mask(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label mask (palette or gray PNG) as HxW uint8 indices; check its size against ``shape``."""
    with _opened(path, "mask") as im:
        if im.mode not in ("P", "L"):
            raise DataError(f"{path}: mask must be a palette or 8-bit gray PNG, got mode {im.mode}")
        mask = np.asarray(im, dtype=np.uint8).copy()
    if shape is not None:
        _check_mask_shape(path, mask.shape, shape)
    return mask


def check_mask_sizes(ds: SegDataset) -> None:
    """Every GT mask has its image's size (headers only): else a ``DataError`` naming the first that has not."""
    for s in ds.samples:
        if s.mask_path:
            with _opened(s.mask_path, "mask") as m:
                w, h = m.size
            _check_mask_shape(s.mask_path, (h, w), image_shape(s.image_path))


def spread(items: list, limit: int | None) -> list:
    """``limit`` items spread evenly over ``items`` (all of them when limit is None or larger): a split file
    is often sorted by class, so its first images show few classes."""
    n = len(items)
    return items if limit is None or limit >= n else [items[i * n // limit] for i in range(limit)]


def find_image(folder: Path, stem: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.exists():
                return cand
    raise DataError(f"{folder / stem}.*: no image with this id (looked for {', '.join(IMAGE_EXTENSIONS)})")


def _read_text(path: Path) -> str:
    """A UTF-8 text file (a leading BOM, as spreadsheet programs write, is dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def read_classes(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"{path}: classes file not found (one class name per line)")
    classes = _lines(path)
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
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, tuple[int, ...]] = {}
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
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
            raise DataError(f"{path}:{lineno}: unknown class {unknown[0]!r} for image {image!r}; "
                            f"{_closest_class(unknown[0], classes)}")
        if image in out:
            raise DataError(f"{path}:{lineno}: duplicate image id {image!r}")
        out[image] = tuple(sorted({index[n] for n in names}))
    return out


def _closest_class(name: str, classes: list[str]) -> str:
    close = difflib.get_close_matches(name, classes, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(classes)}"


def labels_from_mask(mask: np.ndarray, num_classes: int, background: bool) -> tuple[int, ...]:
    values = np.unique(mask)
    offset = int(background)
    return tuple(int(v) - offset for v in values if offset <= v < num_classes + offset)


def read_split(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"{path}: split file not found")
    ids = _lines(path)
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
