"""The map-method registry, in a module of its own (as timm's ``_registry.py``): each method's module imports it to
register its methods, and ``pipeline/maps/__init__.py`` imports those modules and hands the names on, so the
imports point one way. The interface of a method is in ``pipeline/maps/__init__.py``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.maps._visualizations import VISUALIZATIONS
from pipeline.registry import Registry

MapMethod = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

MAP_METHODS: Registry[MapMethod] = Registry("map method", "maps.methods")
register_map = MAP_METHODS.register


def get_map_method(name: str) -> MapMethod:
    """The map method ``name``; an unknown name is a ``ConfigError`` naming ``maps.methods``, which for a
    run-once visualisation says where it goes instead."""
    if name not in MAP_METHODS and name in VISUALIZATIONS:  # filled by class_model, which pipeline.maps imports
        raise ConfigError(f"config key 'maps.methods': {name!r} is a run-once visualisation, not a map method; "
                          "move it to maps.visualizations")
    return MAP_METHODS.get(name)


def configured_method(name: str, options: object | None = None) -> MapMethod:
    """The method ``name`` with its options (a config dataclass, e.g. ``maps.smoothgrad``) bound."""
    fn = get_map_method(name)
    return functools.partial(fn, **dataclasses.asdict(options)) if options is not None else fn
