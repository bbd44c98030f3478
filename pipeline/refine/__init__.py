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
from pipeline.runfolder import read_json

__all__ = ["REFINERS", "SUFFIX", "Refiner", "get_refiner", "label_sets", "register_refiner", "walked_maps",
           "DECOUPLED", "decoupled_ran", "map_sets", "round_two_sets"]

SUFFIX = "_rw"  # maps/<method>_rw/ and refined/<refiner>_rw/: after the affinity random walk (refine/affinity.py)
# maps/<method>_dc/ and refined/<refiner>_dc[_rw]/: the context-decoupled second round (pipeline/decouple.py)
DECOUPLED = "_dc"


def walked_maps(cfg: Config) -> str:
    """The map method of the affinity stage's walked maps (maps/<refine.method>_rw/)."""
    return cfg.refine.method + SUFFIX


def decoupled_ran(cfg: Config) -> bool:
    """Whether the run's decouple stage made a second round (it does only for classes bound to a context)."""
    done = cfg.run_path / "decouple.done.json"
    return cfg.decouple.enabled and done.exists() and bool(read_json(done).get("classes"))


def round_two_sets(cfg: Config) -> dict[str, str]:
    """The label sets of the decoupled round -> their maps: each of affinity.refiners on the round's walked maps
    with the affinity stage, else each of refine.refiners on the round's maps."""
    maps = cfg.refine.method + DECOUPLED
    if cfg.affinity.enabled:
        return {r + DECOUPLED + SUFFIX: maps + SUFFIX for r in cfg.affinity.refiners}
    return {r + DECOUPLED: maps for r in cfg.refine.refiners}


def map_sets(cfg: Config) -> list[str]:
    """Every maps/<name>/ folder of per-image maps a run holds: maps.methods, the walked maps, the decoupled
    round's maps (and their walk)."""
    names = list(cfg.maps.methods) + ([walked_maps(cfg)] if cfg.affinity.enabled else [])
    if decoupled_ran(cfg):
        names += [cfg.refine.method + DECOUPLED] + ([cfg.refine.method + DECOUPLED + SUFFIX]
                                                     if cfg.affinity.enabled else [])
    return names


def label_sets(cfg: Config, round_two: bool = True) -> dict[str, str]:
    """Every refined label set of a run (refined/<name>/) -> the maps it refines: each of refine.refiners on
    refine.method's maps, with the affinity stage each of affinity.refiners on the walked maps, and where the
    decouple stage made a second round (and ``round_two``), its sets (``round_two_sets``)."""
    sets = {r: cfg.refine.method for r in cfg.refine.refiners}
    if cfg.affinity.enabled:
        sets |= {r + SUFFIX: walked_maps(cfg) for r in cfg.affinity.refiners}
    if round_two and decoupled_ran(cfg):
        sets |= round_two_sets(cfg)
    return sets
