"""The registry of the run-once visualisations, in a module of its own: a visualisation's module (``class_model``)
imports it to register itself, and ``pipeline.maps`` and ``pipeline.maps.visualize`` import that module, so the
imports point one way; the map-method registry (``_registry.py``) reads it to name a visualisation put among the map
methods. The contract of a visualisation is in ``pipeline/maps/visualize.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.registry import Registry

Visualization = Callable[..., Any]

VISUALIZATIONS: Registry[Visualization] = Registry("visualisation", "maps.visualizations")
register_visualization = VISUALIZATIONS.register
get_visualization = VISUALIZATIONS.get
