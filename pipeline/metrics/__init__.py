"""Segmentation and classification metrics; the faithfulness of class maps (``pipeline.metrics.faithfulness``)."""

from pipeline.metrics.faithfulness import (
    average_drop,
    energy_pointing_game,
    increase_in_confidence,
)
from pipeline.metrics.segmentation import ConfusionMatrix, mean_average_precision

__all__ = ["ConfusionMatrix", "average_drop", "energy_pointing_game", "increase_in_confidence",
           "mean_average_precision"]
