"""Segmentation and classification metrics."""

from pipeline.metrics.segmentation import ConfusionMatrix, mean_average_precision

__all__ = ["ConfusionMatrix", "mean_average_precision"]
