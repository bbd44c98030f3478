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

from pipeline.config import Config
from pipeline.refine import crf as _crf  # noqa: F401  (registers the refiners)
from pipeline.refine import graphcut as _graphcut  # noqa: F401
from pipeline.refine import sam as _sam  # noqa: F401
from pipeline.refine import threshold as _threshold  # noqa: F401
from pipeline.refine._registry import REFINERS, Refiner, get_refiner, register_refiner

__all__ = ["REFINERS", "SUFFIX", "Refiner", "get_refiner", "label_sets", "register_refiner", "walked_maps"]

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
