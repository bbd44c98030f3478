"""Class-map methods behind one interface and one registry.

Every method is ``method(model, images: Tensor[B,3,H,W], classes: Tensor[B,C] bool) -> Tensor[B,C,H,W]``:
float, >= 0, per-class maps at input resolution, zero for the classes not asked for. Batching, AMP and
the device are the caller's concern.

Run-once methods share the registry, so that configs name them alike (``maps.methods: [cam, class_model]``),
but map no image: they carry the attribute ``per_image = False`` and are called once per run as
``method(model, checkpoint, png, json, **options)``, writing ``maps/<name>.png`` and then
``maps/<name>.json``. ``class_model`` (Simonyan et al. 2014's class model visualisation) is one;
``is_per_image`` and ``method_outputs`` in ``pipeline.maps.generate`` tell the kinds apart, and
evaluation scores the per-image methods only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.registry import Registry

MapMethod = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

MAP_METHODS: Registry[MapMethod] = Registry("map method", "maps.methods")
register_map = MAP_METHODS.register
get_map_method = MAP_METHODS.get


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
from pipeline.maps import class_model as _class_model  # noqa: E402,F401
from pipeline.maps import gradients as _gradients  # noqa: E402,F401
from pipeline.maps import scorecam as _scorecam  # noqa: E402,F401
