"""Deterministic synthetic dataset for weakly supervised segmentation, written in PASCAL VOC layout.

Every image holds 1 to 3 objects. Each object class has its own shape and its own texture
(see ``SYNTHETIC_CLASSES``); object colours are drawn per instance from the same range as the
background colours, and the background is a smooth colour field with clutter (thin lines, strokes,
small elongated ellipses, open rectangles) in the same colours. So no colour threshold can segment
the objects, while a small CNN can learn them from image-level labels (shape + texture).

Later objects occlude earlier ones; the mask holds what is visible, objects whose visible area falls
under ``MIN_VISIBLE`` of the image are left out of both image and mask, and ``labels.csv`` lists the
classes present in the final mask. Sample ``i`` is rendered from ``np.random.default_rng([seed, i])``,
so each sample depends only on ``(seed, i, size)``.

Layout written by :func:`generate`::

    root/JPEGImages/syn_00000.png            RGB, lossless
    root/SegmentationClass/syn_00000.png     palette PNG (VOC colours), 0 = background, k = classes[k-1]
    root/ImageSets/Segmentation/train.txt    first n_train ids
    root/ImageSets/Segmentation/val.txt      the next n_val ids
    root/classes.txt                         foreground class names, one a line
    root/labels.csv                          image,labels  (space-separated class names)
    root/.complete                           JSON of the parameters, written last
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.errors import ConfigError, DataError
from pipeline.runfolder import voc_palette

log = logging.getLogger(__name__)

SYNTHETIC_CLASSES: list[str] = ["disc", "square", "triangle", "star", "ring", "cross"]

FORMAT_VERSION = 1                 # bump when the rendering changes, so old datasets are regenerated
MIN_SIZE = 32                      # smallest image side accepted by generate()
MIN_VISIBLE = 0.03                 # objects showing less than this fraction of the image are dropped
SPLITS = ("train", "val")          # the split files written: the first n_train images, then the n_val others
AREA_RANGE = (0.045, 0.18)         # unoccluded object area, as a fraction of the image
COUNT_PROBS = (0.35, 0.40, 0.25)   # probability of 1, 2, 3 objects
SAME_CLASS_PROB = 0.08             # chance that an extra object may repeat a class already in the image
COLOUR_RANGE = (20.0, 235.0)       # every colour (objects, background, clutter) is drawn from this range
MIN_CONTRAST = 90.0                # least RGB distance between the two colours of an object's texture
NOISE_SIGMA = 5.0                  # per-pixel Gaussian noise, in 0..255 units
CLUTTER_RANGE = (10, 22)           # number of clutter items per image (upper bound exclusive)
ID_FORMAT = "syn_{:05d}"

_SHIFT = 4                         # fixed-point bits for the cv2 drawing calls (sub-pixel precision)
_ONE = 1 << _SHIFT

Rng = np.random.Generator


# ----------------------------------------------------------------------------------------------- helpers


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), float32, shape (size, size); read-only."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def _fixed(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates -> int32 fixed-point points for cv2 (``shift=_SHIFT``)."""
    return np.round(points * _ONE).astype(np.int32)


def _colour(rng: Rng) -> np.ndarray:
    return rng.uniform(*COLOUR_RANGE, size=3).astype(np.float32)


def _colour_pair(rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    """Two colours from the common range, at least MIN_CONTRAST apart (so the texture shows)."""
    c1 = _colour(rng)
    cands = rng.uniform(*COLOUR_RANGE, size=(16, 3)).astype(np.float32)
    far = np.linalg.norm(cands - c1, axis=1) >= MIN_CONTRAST
    c2 = cands[int(np.argmax(far))] if far.any() else np.float32(255.0) - c1
    return c1, c2


# ------------------------------------------------------------------------------------------------ shapes


@dataclass(slots=True)
class _Obj:
    """One object instance: class value (1-based), shape name, pose, and its unoccluded binary mask."""

    cls: int
    name: str
    cx: float
    cy: float
    r: float
    theta: float
    mask: np.ndarray


def _polygon(obj_pts: np.ndarray, cx: float, cy: float, theta: float) -> np.ndarray:
    """Object-frame points (N, 2) rotated by theta and moved to (cx, cy)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, s], [-s, c]])
    return obj_pts @ rot + np.array([cx, cy])


def _star_points(r: float) -> np.ndarray:
    ang = np.arange(10) * (math.pi / 5) - math.pi / 2
    rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


def _cross_points(r: float) -> np.ndarray:
    w = 0.3 * r
    return np.array([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
                     (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)])


def _regular_points(r: float, n: int, phase: float) -> np.ndarray:
    ang = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)


# area of each shape = coefficient * r**2, r being the shape's outer radius
_AREA_COEF: dict[str, float] = {
    "disc": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * 0.45 * math.sin(math.pi / 5),
    "ring": math.pi * (1 - 0.55 ** 2),
    "cross": 8 * 0.3 - 4 * 0.3 ** 2,
}


def _draw_shape(name: str, size: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Binary uint8 mask of one shape, rasterised without anti-aliasing (so mask and image agree)."""
    m = np.zeros((size, size), np.uint8)
    centre = (round(cx * _ONE), round(cy * _ONE))
    if name in ("disc", "ring"):
        cv2.circle(m, centre, round(r * _ONE), 1, -1, cv2.LINE_8, _SHIFT)
        if name == "ring":
            cv2.circle(m, centre, round(0.55 * r * _ONE), 0, -1, cv2.LINE_8, _SHIFT)
        return m
    if name == "square":
        pts = _regular_points(r, 4, math.pi / 4)
    elif name == "triangle":
        pts = _regular_points(r, 3, -math.pi / 2)
    elif name == "star":
        pts = _star_points(r)
    elif name == "cross":
        pts = _cross_points(r)
    else:
        raise ValueError(f"unknown synthetic class {name!r} (known: {', '.join(_AREA_COEF)})")
    cv2.fillPoly(m, [_fixed(_polygon(pts, cx, cy, theta))], 1, cv2.LINE_8, _SHIFT)
    return m


# ---------------------------------------------------------------------------------------------- textures
# Each texture maps object-frame coordinates (u, v) and radius rho = |(u, v)| to t in [0, 1], the mix
# between the instance's two colours.

TextureFn = Callable[[Rng, np.ndarray, np.ndarray, float, int], np.ndarray]


def _frame(size: int, cx: float, cy: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = _grid(size)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    return dx * c + dy * s, -dx * s + dy * c


def _tex_gradient(rng: Rng, u: np.ndarray, v: np.ndarray, r: float, size: int) -> np.ndarray:
    """Smooth linear gradient across the object (disc)."""
    t = np.clip(0.5 + 0.5 * u / np.float32(r), 0.0, 1.0)
    return t if rng.random() < 0.5 else 1.0 - t


def _tex_checker(rng: Rng, u: np.ndarray, v: np.ndarray, r: float, size: int) -> np.ndarray:
    """Checkerboard aligned with the square's edges, 3 to 5 cells a side."""
    side = r * math.sqrt(2.0)
    n = int(rng.integers(3, 6))
    p, h = np.float32(side / n), np.float32(side / 2)
    # clip the cell index so edge pixels (rasterised just outside [-h, h]) keep their cell's colour
    iu = np.clip(np.floor((u + h) / p), 0, n - 1)
    iv = np.clip(np.floor((v + h) / p), 0, n - 1)
    return ((iu + iv) % 2).astype(np.float32)


def _tex_stripes(rng: Rng, u: np.ndarray, v: np.ndarray, r: float, size: int) -> np.ndarray:
    """Diagonal stripes (at 45 degrees in the object frame)."""
    p = np.float32(max(r * rng.uniform(0.28, 0.4), 4.0))
    d = (u + v) * np.float32(math.sqrt(0.5)) + np.float32(rng.uniform(0, p))
    return ((d / p) % 1.0 < 0.5).astype(np.float32)


def _tex_dots(rng: Rng, u: np.ndarray, v: np.ndarray, r: float, size: int) -> np.ndarray:
    """Regular grid of round dots."""
    p = np.float32(max(r * rng.uniform(0.22, 0.3), 4.0))
    fu, fv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
    return (fu * fu + fv * fv < np.float32(0.34 ** 2)).astype(np.float32)


def _tex_bands(rng: Rng, u: np.ndarray, v: np.ndarray, r: float, size: int) -> np.ndarray:
    """Concentric bands around the object centre (ring)."""
    p = np.float32(max(0.45 * r / rng.uniform(1.5, 2.5), 3.0))
    rho = np.sqrt(u * u + v * v)
    return ((rho / p) % 1.0 < 0.5).astype(np.float32)


def _tex_noise(rng: Rng, u: np.ndarray, v: np.ndarray, r: float, size: int) -> np.ndarray:
    """Blocky random noise (2-3 px blocks at 128 px)."""
    b = max(1, round(size / 128 * rng.uniform(2.0, 3.0)))
    n = -(-size // b)
    low = rng.random((n, n), dtype=np.float32)
    return np.repeat(np.repeat(low, b, axis=0), b, axis=1)[:size, :size]


_TEXTURES: dict[str, TextureFn] = {
    "disc": _tex_gradient,
    "square": _tex_checker,
    "triangle": _tex_stripes,
    "star": _tex_dots,
    "ring": _tex_bands,
    "cross": _tex_noise,
}


# -------------------------------------------------------------------------------------------- background


def _background(rng: Rng, size: int) -> np.ndarray:
    """Smooth random colour field (smoothstep-interpolated coarse grid) plus a linear colour ramp."""
    g = int(rng.integers(2, 5))
    coarse = rng.uniform(*COLOUR_RANGE, size=(g, g, 3)).astype(np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * (g - 1)
    i0 = np.minimum(pos.astype(np.int64), g - 2)
    f = (pos - i0).astype(np.float32)
    f = f * f * (3 - 2 * f)
    rows = coarse[i0] * (1 - f)[:, None, None] + coarse[i0 + 1] * f[:, None, None]        # (size, g, 3)
    field = rows[:, i0] * (1 - f)[None, :, None] + rows[:, i0 + 1] * f[None, :, None]     # (size, size, 3)
    u, _ = _frame(size, size / 2, size / 2, rng.uniform(0, 2 * math.pi))
    amp = rng.uniform(-35.0, 35.0, size=3).astype(np.float32)
    field += (u / np.float32(size))[..., None] * amp
    return np.ascontiguousarray(np.clip(field, 0.0, 255.0), dtype=np.float32)


def _clutter(rng: Rng, img: np.ndarray) -> None:
    """Draw small, non-class-like clutter in place: thin lines, strokes, elongated ellipses, open rectangles.

    Everything stays well under object size or is thin, so no clutter item reads as a class shape.
    """
    size = img.shape[0]

    def thick() -> int:
        return max(1, round(size / 100 * rng.uniform(0.8, 2.2)))

    def point() -> np.ndarray:
        return rng.uniform(-0.05 * size, 1.05 * size, size=2)

    for _ in range(int(rng.integers(*CLUTTER_RANGE))):
        colour = tuple(float(c) for c in _colour(rng))
        kind = int(rng.integers(4))
        if kind == 0:      # thin straight line
            p0 = point()
            ang, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.5) * size
            p1 = p0 + length * np.array([math.cos(ang), math.sin(ang)])
            a, b = _fixed(p0), _fixed(p1)
            cv2.line(img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), colour, thick(), cv2.LINE_8, _SHIFT)
        elif kind == 1:    # short curvy stroke (random walk polyline)
            n = int(rng.integers(3, 6))
            steps = rng.normal(0, 0.07 * size, size=(n - 1, 2))
            pts = np.cumsum(np.vstack([point(), steps]), axis=0)
            cv2.polylines(img, [_fixed(pts)], False, colour, thick(), cv2.LINE_8, _SHIFT)
        elif kind == 2:    # small elongated ellipse, filled
            major = rng.uniform(0.02, 0.07) * size
            minor = major * rng.uniform(0.25, 0.6)
            c = _fixed(point())
            axes = (round(major * _ONE), round(minor * _ONE))
            cv2.ellipse(img, (int(c[0]), int(c[1])), axes, rng.uniform(0, 180), 0, 360, colour, -1,
                        cv2.LINE_8, _SHIFT)
        else:              # open rectangle: 2 or 3 sides of a small rotated rectangle
            w, h = rng.uniform(0.05, 0.25, size=2) * size
            corners = np.array([(-w, -h), (w, -h), (w, h), (-w, h)]) / 2
            pts = _polygon(corners, *point(), rng.uniform(0, math.pi))
            start, n_sides = int(rng.integers(4)), int(rng.integers(2, 4))
            idx = [(start + k) % 4 for k in range(n_sides + 1)]
            cv2.polylines(img, [_fixed(pts[idx])], False, colour, thick(), cv2.LINE_8, _SHIFT)


# ---------------------------------------------------------------------------------------------- sampling


def _pick_classes(rng: Rng, n_classes: int) -> list[int]:
    count = int(rng.choice(len(COUNT_PROBS), p=COUNT_PROBS)) + 1
    picked = [int(rng.integers(n_classes))]
    for _ in range(count - 1):
        unused = [k for k in range(n_classes) if k not in picked]
        if not unused or rng.random() < SAME_CLASS_PROB:
            picked.append(int(rng.integers(n_classes)))
        else:
            picked.append(unused[int(rng.integers(len(unused)))])
    return picked


def _place(rng: Rng, size: int, classes: list[str], bound: dict[str, str]) -> list[_Obj]:
    objs = []
    lo, hi = (math.sqrt(a) for a in AREA_RANGE)
    picked = _pick_classes(rng, len(classes))
    picked += [classes.index(bound[classes[k]]) for k in picked if classes[k] in bound]  # a bound class's partner
    for k in picked:
        name = classes[k]
        area = rng.uniform(lo, hi) ** 2 * size * size       # uniform in linear size
        r = math.sqrt(area / _AREA_COEF[name])
        cx, cy = rng.uniform(0.12, 0.88, size=2) * size
        theta = rng.uniform(0, 2 * math.pi)
        objs.append(_Obj(k + 1, name, cx, cy, r, theta, _draw_shape(name, size, cx, cy, r, theta)))
    return objs


def _instances(objs: list[_Obj], size: int) -> np.ndarray:
    inst = np.zeros((size, size), np.uint8)
    for j, o in enumerate(objs, start=1):
        inst[o.mask > 0] = j
    return inst


def _visible(objs: list[_Obj], size: int) -> tuple[list[_Obj], np.ndarray]:
    """Drop, one at a time, the least visible object while any shows less than MIN_VISIBLE of the image."""
    min_area = MIN_VISIBLE * size * size
    objs = list(objs)
    while objs:
        inst = _instances(objs, size)
        counts = np.bincount(inst.ravel(), minlength=len(objs) + 1)[1:]
        worst = int(np.argmin(counts))
        if counts[worst] >= min_area:
            return objs, inst
        del objs[worst]
    return [], np.zeros((size, size), np.uint8)


def render_sample(rng: np.random.Generator, size: int, classes: list[str] = SYNTHETIC_CLASSES,
                  bound: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 uint8 RGB) and its mask (HxW uint8: 0 = background, k = classes[k-1]).

    ``classes`` may be any subset or reordering of ``SYNTHETIC_CLASSES``; every image holds at least
    one object, and the mask values present are exactly the classes visible in the image.
    ``bound`` {a: b}: class a is never shown without class b (b may show alone), as a boat is never seen
    without water: the pair the label statistics and the decoupled round are tested on.
    """
    bound = bound or {}
    unknown = [c for c in [*classes, *bound, *bound.values()] if c not in classes or c not in _AREA_COEF]
    if unknown or not classes:
        raise ValueError(f"synthetic classes must be a non-empty subset of {SYNTHETIC_CLASSES}, "
                         f"got {classes} (bound {bound})")
    if size < 16:
        raise ValueError(f"synthetic image size must be at least 16 px, got {size}")
    for _ in range(100):
        objs, inst = _visible(_place(rng, size, classes, bound), size)
        names = {o.name for o in objs}
        if objs and all(b in names for a, b in bound.items() if a in names):
            break
    else:  # pragma: no cover - each try keeps an object with high probability
        raise RuntimeError("could not place a visible object in 100 tries")

    img = _background(rng, size)
    _clutter(rng, img)
    for j, o in enumerate(objs, start=1):
        c1, c2 = _colour_pair(rng)
        u, v = _frame(size, o.cx, o.cy, o.theta)
        t = _TEXTURES[o.name](rng, u, v, o.r, size)
        sel = inst == j
        img[sel] = c1 + t[sel][:, None] * (c2 - c1)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(NOISE_SIGMA)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    lut = np.zeros(len(objs) + 1, np.uint8)
    lut[1:] = [o.cls for o in objs]
    return image, lut[inst]


# --------------------------------------------------------------------------------------------- on disk


def _params(n_train: int, n_val: int, size: int, seed: int, classes: list[str] = SYNTHETIC_CLASSES,
            bound: dict[str, str] | None = None) -> dict:
    params = {"generator": "pipeline.data.synthetic", "version": FORMAT_VERSION, "n_train": n_train,
              "n_val": n_val, "size": size, "seed": seed, "classes": list(classes)}
    return params | ({"bound": dict(bound)} if bound else {})


def _is_complete(root: Path, params: dict) -> bool:
    try:
        return json.loads((root / ".complete").read_text(encoding="utf-8")) == params
    except (OSError, ValueError):
        return False


def _check(n_train: int, n_val: int, size: int, seed: int) -> None:
    key = "data.synthetic"
    for name, value in (("n_train", n_train), ("n_val", n_val), ("size", size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"{key}.{name}: expected an integer, got {value!r}")
    if n_train < 0 or n_val < 0 or n_train + n_val < 1:
        raise ConfigError(f"{key}: n_train and n_val must be >= 0 with at least one image, "
                          f"got {n_train}, {n_val}")
    if size < MIN_SIZE:
        raise ConfigError(f"{key}.size: expected at least {MIN_SIZE} px, got {size}")
    if seed < 0:
        raise ConfigError(f"{key}.seed: expected a non-negative integer, got {seed}")


def _write(folder: Path, params: dict) -> None:
    n_train, n_val, size, seed = params["n_train"], params["n_val"], params["size"], params["seed"]
    img_dir, mask_dir, sets_dir = folder / "JPEGImages", folder / "SegmentationClass", folder / "ImageSets"
    for d in (img_dir, mask_dir, sets_dir / "Segmentation"):
        d.mkdir(parents=True)
    palette = voc_palette()
    ids = [ID_FORMAT.format(i) for i in range(n_train + n_val)]
    rows = ["image,labels"]
    for i, sid in enumerate(ids):
        image, mask = render_sample(np.random.default_rng([seed, i]), size, params["classes"], params.get("bound"))
        Image.fromarray(image).save(img_dir / f"{sid}.png", format="PNG", compress_level=1)
        pm = Image.fromarray(mask)
        pm.putpalette(palette)
        pm.save(mask_dir / f"{sid}.png", format="PNG", compress_level=9)
        present = [params["classes"][k - 1] for k in np.unique(mask) if k > 0]
        rows.append(f"{sid},{' '.join(present)}")
    for split, part in zip(SPLITS, (ids[:n_train], ids[n_train:]), strict=True):
        (sets_dir / "Segmentation" / f"{split}.txt").write_text("".join(f"{s}\n" for s in part), "utf-8")
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in params["classes"]), "utf-8")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n", "utf-8")
    (folder / ".complete").write_text(json.dumps(params, indent=2) + "\n", "utf-8")   # last


def _move_into_place(tmp: Path, root: Path, params: dict) -> None:
    """Rename the finished ``tmp`` folder to ``root``, replacing an older synthetic dataset there."""
    old: Path | None = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
        os.replace(root, old)      # root (a directory) replaces the empty placeholder
    try:
        os.rename(tmp, root)
    except OSError:
        if not _is_complete(root, params):   # someone else finished the same dataset meanwhile: fine
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def generate(root: Path, n_train: int = 400, n_val: int = 100, size: int = 128, seed: int = 0,
             classes: list[str] = SYNTHETIC_CLASSES, bound: dict[str, str] | None = None) -> None:
    """Write the dataset under root (idempotent: if root/'.complete' holds the same parameters, do nothing).
    ``classes`` and ``bound``: as :func:`render_sample` takes them (the tests' datasets of a bound pair).

    The dataset is written to a temporary folder next to ``root`` and renamed into place when complete,
    so an interrupted run never leaves a partial dataset that looks complete. An older synthetic
    dataset at ``root`` (one with a ``.complete`` file) is replaced; any other non-empty folder there
    is left alone and a ``DataError`` is raised.
    """
    root = Path(root)
    _check(n_train, n_val, size, seed)
    params = _params(int(n_train), int(n_val), int(size), int(seed), classes, bound)
    if _is_complete(root, params):
        return
    if root.exists():
        if not root.is_dir():
            raise DataError(f"{root}: exists and is not a folder; cannot write the synthetic dataset there")
        if not (root / ".complete").exists() and any(root.iterdir()):
            raise DataError(f"{root}: folder exists and is not a synthetic dataset (no .complete file); "
                            "remove it or point data.root elsewhere")
        log.info("%s: replacing the synthetic dataset (generated with other parameters)", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: generating %d + %d synthetic images of %d px (seed %d)", root, n_train, n_val, size, seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        _write(tmp, params)
        _move_into_place(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
