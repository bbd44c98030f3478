"""Refiners: class maps (+ the image) -> a label map in the dataset's label index space, 255 = ignore.

A refiner is ``fn(maps [K,H,W] float32 in [0,1], classes [K] int, image HxWx3 uint8 | None,
background: bool, cfg: RefineConfig) -> uint8 [H,W]`` and never writes a class outside ``classes``.
A refiner registered with ``cache=True`` is also given ``cache: Path | None``, keyword-only: a path stem
unique to the image inside the run folder (``<run>/cache/<refiner>/<image id>``), where it may keep what
depends only on the image (e.g. an encoder's embedding) across runs; ``None`` means no caching.
A refiner registered with ``names=True`` is also given ``class_names``, keyword-only: the dataset's class names,
indexed by ``classes`` (e.g. to treat stuff classes apart).
Such a refiner may also have ``prepare(images: list[Path], caches: list[Path], cfg: RefineConfig, device: str)``,
which the runner calls once in the main process before the per-image jobs, with the images still to refine and
their cache stems: it fills the caches in batches (e.g. an image encoder on the GPU, in mixed precision).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.config import Config
from pipeline.registry import Registry

SUFFIX = "_rw"  # maps/<method>_rw/ and refined/<refiner>_rw/: after the affinity random walk (refine/affinity.py)


def walked_maps(cfg: Config) -> str:
    """The map method of the affinity stage's walked maps (maps/<refine.method>_rw/)."""
    return cfg.refine.method + SUFFIX


def label_sets(cfg: Config) -> dict[str, str]:
    """Every refined label set of a run (refined/<name>/) -> the maps it refines: each of refine.refiners on
    refine.method's maps, and with the affinity stage on each of affinity.refiners on the walked maps."""
    sets = {r: cfg.refine.method for r in cfg.refine.refiners}
    if cfg.affinity.enabled:
        sets |= {r + SUFFIX: walked_maps(cfg) for r in cfg.affinity.refiners}
    return sets


@dataclass(frozen=True)
class Refiner:
    fn: Callable[..., np.ndarray]
    needs_image: bool
    cache: bool = False
    prepare: Callable[..., None] | None = None
    names: bool = False


REFINERS: Registry[Refiner] = Registry("refiner", "refine.refiners")
get_refiner = REFINERS.get


def register_refiner(name: str, needs_image: bool = False, cache: bool = False,
                     prepare: Callable[..., None] | None = None, names: bool = False):
    def deco(fn):
        REFINERS.add(name, Refiner(fn, needs_image, cache, prepare, names))
        return fn

    return deco


from pipeline.refine import crf as _crf  # noqa: E402,F401  (registers the refiners)
from pipeline.refine import graphcut as _graphcut  # noqa: E402,F401  (registers the refiners)
from pipeline.refine import sam as _sam  # noqa: E402,F401  (registers the refiners)
from pipeline.refine import threshold as _threshold  # noqa: E402,F401  (registers the refiners)
