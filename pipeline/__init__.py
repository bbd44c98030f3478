"""Weakly supervised semantic segmentation: image-level labels -> class maps -> pseudo-masks -> segmenter."""

__version__ = "0.1.0"
