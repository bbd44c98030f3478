"""The export-format names a config may use (``export.formats``), in a module that imports nothing:
``pipeline.config.validate`` checks names against them without importing the writers (whose modules load numpy,
PIL and the run-folder helpers, while every module of the pipeline imports the config). ``tests/test_export.py``
checks that ``FORMAT_NAMES`` is exactly ``voc`` and what ``pipeline.formats.FORMATS`` registers, in that order."""

from __future__ import annotations

VOC = "voc"  # pseudo_masks/: always written, the segmenter trains on it
FORMAT_NAMES = (VOC, "coco", "cvat", "hf", "mmseg", "yolo")
