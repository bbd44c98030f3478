"""Refiners: class maps (+ the image) -> a label map in the dataset's label index space, 255 = ignore.

A refiner is ``fn(maps [K,H,W] float32 in [0,1], classes [K] int, image HxWx3 uint8 | None,
background: bool, cfg: RefineConfig) -> uint8 [H,W]`` and never writes a class outside ``classes``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.config import Config
from pipeline.registry import Registry

SUFFIX = "_rw"  # maps/<method>_rw/ and refined/<refiner>_rw/: after the affinity random walk (refine/affinity.py)


def walked_refiners(cfg: Config) -> list[str]:
    """The label sets of the affinity stage (refined/<refiner>_rw/): none when it is off."""
    return [r + SUFFIX for r in cfg.affinity.refiners] if cfg.affinity.enabled else []


@dataclass(frozen=True)
class Refiner:
    fn: Callable[..., np.ndarray]
    needs_image: bool


REFINERS: Registry[Refiner] = Registry("refiner", "refine.refiners")
get_refiner = REFINERS.get


def register_refiner(name: str, needs_image: bool = False):
    def deco(fn):
        REFINERS.add(name, Refiner(fn, needs_image))
        return fn

    return deco


from pipeline.refine import crf as _crf  # noqa: E402,F401  (registers the refiners)
from pipeline.refine import graphcut as _graphcut  # noqa: E402,F401  (registers the refiners)
from pipeline.refine import threshold as _threshold  # noqa: E402,F401  (registers the refiners)
