"""The refiner registry, in a module of its own (as timm's ``_registry.py``): each refiner module imports it to
register itself, and ``pipeline/refine/__init__.py`` imports those modules and hands the names on, so the imports
point one way. The contract of a refiner is in ``pipeline/refine/__init__.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.registry import Registry


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
