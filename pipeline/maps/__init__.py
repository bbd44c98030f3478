"""Class-map methods behind one interface and one registry.

Every method is ``method(model, images: Tensor[B,3,H,W], classes: Tensor[B,C] bool) -> Tensor[B,C,H,W]``:
float, >= 0, per-class maps at input resolution, zero for the classes not asked for. Batching, AMP and
the device are the caller's concern.

Run-once visualisations of the classifier (``class_model``, named in ``maps.visualizations``) map no image:
they have their own registry, ``pipeline.maps.visualize``.
"""

from __future__ import annotations

from pipeline.maps import acol as _acol  # noqa: F401  (registers the methods)
from pipeline.maps import cam as _cam  # noqa: F401
from pipeline.maps import class_model as _class_model  # noqa: F401  (a visualisation: get_map_method names it)
from pipeline.maps import gradients as _gradients  # noqa: F401
from pipeline.maps import scorecam as _scorecam  # noqa: F401
from pipeline.maps._registry import MAP_METHODS, MapMethod, configured_method, get_map_method, register_map
from pipeline.maps.ops import chunks, upsampled_channels

__all__ = ["MAP_METHODS", "MapMethod", "chunks", "configured_method", "get_map_method", "register_map",
           "upsampled_channels"]
