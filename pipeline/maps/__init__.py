"""Class-map methods behind one interface and one registry.

Every method is ``method(model, images: Tensor[B,3,H,W], classes: Tensor[B,C] bool) -> Tensor[B,C,H,W]``:
float, >= 0, per-class maps at input resolution, zero for the classes not asked for. Batching, AMP and
the device are the caller's concern.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import ConfigError

MapMethod = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

MAP_METHODS: dict[str, MapMethod] = {}


def register_map(name: str):
    def deco(fn: MapMethod) -> MapMethod:
        MAP_METHODS[name] = fn
        return fn

    return deco


def get_map_method(name: str) -> MapMethod:
    if name not in MAP_METHODS:
        raise ConfigError(f"config key 'maps.methods': unknown map method {name!r}; "
                          f"expected one of {', '.join(sorted(MAP_METHODS))}")
    return MAP_METHODS[name]


from pipeline.maps import cam as _cam  # noqa: E402,F401  (registers the methods)
