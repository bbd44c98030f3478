"""Class-map methods behind one interface and one registry.

Every method is ``method(model, images: Tensor[B,3,H,W], classes: Tensor[B,C] bool) -> Tensor[B,C,H,W]``:
float, >= 0, per-class maps at input resolution, zero for the classes not asked for. Batching, AMP and
the device are the caller's concern.

Run-once visualisations of the classifier (``class_model``, named in ``maps.visualizations``) map no image:
they have their own registry, ``pipeline.maps.visualize``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.registry import Registry

MapMethod = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

MAP_METHODS: Registry[MapMethod] = Registry("map method", "maps.methods")
register_map = MAP_METHODS.register


def get_map_method(name: str) -> MapMethod:
    """The map method ``name``; an unknown name is a ``ConfigError`` naming ``maps.methods``, which for a
    run-once visualisation says where it goes instead."""
    if name not in MAP_METHODS:
        from pipeline.maps.visualize import VISUALIZATIONS

        if name in VISUALIZATIONS:
            raise ConfigError(f"config key 'maps.methods': {name!r} is a run-once visualisation, not a map method; "
                              "move it to maps.visualizations")
    return MAP_METHODS.get(name)


def configured_method(name: str, options: object | None = None) -> MapMethod:
    """The method ``name`` with its options (a config dataclass, e.g. ``maps.smoothgrad``) bound."""
    fn = get_map_method(name)
    return functools.partial(fn, **dataclasses.asdict(options)) if options is not None else fn


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of at most ``size`` (at least 1) rows covering ``range(n)``: how the methods bound their memory."""
    size = max(1, size)
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def upsampled_channels(acts: torch.Tensor, b: torch.Tensor, k: torch.Tensor,
                       size: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channels ``acts[b, k]`` bilinearly upsampled to ``size`` -> (U [R,1,H,W], their min lo [R,1,1,1], their
    range hi - lo [R,1,1,1], at least the smallest float): the min-max normalisation of Score-CAM's masks,
    s(U(A)) = (U - lo) / range, that its masked inputs (``scorecam``) and the stem basis share."""
    up = F.interpolate(acts[b, k][:, None], size=size, mode="bilinear", align_corners=False)
    lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
    return up, lo, (hi - lo).clamp_min(torch.finfo(up.dtype).tiny)  # a map flattened by U gives H = 0


from pipeline.maps import acol as _acol  # noqa: E402,F401
from pipeline.maps import cam as _cam  # noqa: E402,F401  (registers the methods)
from pipeline.maps import gradients as _gradients  # noqa: E402,F401
from pipeline.maps import scorecam as _scorecam  # noqa: E402,F401
