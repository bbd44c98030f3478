"""Export formats of the pseudo-masks beside the VOC layout (``export.formats``): ``coco``, ``mmseg``, ``yolo``,
``hf``, ``cvat``, one module each, all written from the same label maps (``ExportSource``); docs/formats.md has
each layout and the trainer config that reads it. The registry is in ``_registry.py``."""

from __future__ import annotations

from pipeline.format_names import VOC
from pipeline.formats import coco as _coco  # noqa: F401  (registers the formats)
from pipeline.formats import cvat as _cvat  # noqa: F401
from pipeline.formats import hf as _hf  # noqa: F401
from pipeline.formats import mmseg as _mmseg  # noqa: F401
from pipeline.formats import yolo as _yolo  # noqa: F401
from pipeline.formats._registry import (
    FORMATS,
    ExportItem,
    ExportSource,
    FormatWriter,
    register_format,
    voc_source,
)
from pipeline.formats.cvat import write_cvat

__all__ = ["FORMATS", "FORMAT_NAMES", "VOC", "ExportItem", "ExportSource", "FormatWriter", "register_format",
           "voc_source", "write_cvat"]


def format_names() -> list[str]:
    """Every name ``export.formats`` takes: ``voc`` and the registered formats."""
    return [VOC, *FORMATS]


FORMAT_NAMES = format_names()
