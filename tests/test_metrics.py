from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics import ConfusionMatrix, mean_average_precision
from pipeline.metrics.segmentation import average_precision


def test_confusion_matrix_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 2, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 2, 255, 0]], np.uint8)
    conf = ConfusionMatrix(3)
    conf.update(gt, pred)
    expected = np.array([[1, 1, 0, 0],   # gt 0: one right, one as 1
                         [0, 2, 0, 0],   # gt 1: both right
                         [0, 0, 2, 1]])  # gt 2: two right, one predicted ignore; gt 255 left out
    np.testing.assert_array_equal(conf.mat, expected)
    s = conf.scores()
    # IoU: class 0: 1/(2+1-1)=0.5; class 1: 2/(2+3-2)=2/3; class 2: 2/(3+2-2)=2/3 (ignore counts as a miss)
    np.testing.assert_allclose(s["iou"], [0.5, 2 / 3, 2 / 3])
    np.testing.assert_allclose(s["precision"], [1.0, 2 / 3, 1.0])
    np.testing.assert_allclose(s["recall"], [0.5, 1.0, 2 / 3])
    assert conf.miou() == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert conf.ignore_ratio() == pytest.approx(1 / 7)
    assert conf.pixel_accuracy() == pytest.approx(5 / 7)


def test_absent_class_left_out_of_mean():
    conf = ConfusionMatrix(3)
    conf.update(np.array([0, 1]), np.array([0, 1]))
    assert np.isnan(conf.scores()["iou"][2]) and conf.miou() == 1.0
    assert conf.per_class(["a", "b", "c"])["c"]["iou"] is None


def test_average_precision_by_hand():
    # ranked targets 1,0,1,0 -> precisions at hits 1/1 and 2/3 -> AP = 5/6
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    targets = np.array([[1, 0], [0, 1], [0, 0]])
    assert mean_average_precision(scores, targets) == pytest.approx(1.0)
