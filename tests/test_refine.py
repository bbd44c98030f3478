from __future__ import annotations

import numpy as np

from pipeline.refine import REFINERS
from pipeline.refine.sam import PACKAGED
from pipeline.refine.threshold import threshold_labels
from pipeline.refiner_names import REFINER_NAMES, SAM_PACKAGED


def test_threshold_with_background_band():
    maps = np.array([[[0.9, 0.5, 0.2, 0.1]], [[0.1, 0.1, 0.1, 0.05]]], np.float32)  # K=2, 1x4
    label = threshold_labels(maps, np.array([2, 4]), background=True, fg=0.4, bg=0.15)
    np.testing.assert_array_equal(label, [[3, 3, 255, 0]])  # class 2 -> label 3; 0.2 in the band


def test_threshold_without_background_argmax_and_margin():
    maps = np.array([[[0.9, 0.5, 0.2]], [[0.1, 0.48, 0.8]]], np.float32)
    classes = np.array([0, 5])
    np.testing.assert_array_equal(threshold_labels(maps, classes, False, fg=0), [[0, 0, 5]])
    np.testing.assert_array_equal(threshold_labels(maps, classes, False, fg=0, min_margin=0.05), [[0, 255, 5]])


def test_the_config_knows_exactly_the_registered_refiners():
    """``pipeline.config.validate`` checks refiner names against ``pipeline/refiner_names.py`` (it cannot import
    the refiners without a circle), so that list must be the registry's."""
    assert sorted(REFINER_NAMES) == list(REFINERS) and PACKAGED == SAM_PACKAGED == "packaged"
