"""Confusion-matrix segmentation scores (IoU, precision, recall) and multi-label mean average precision.

Predictions may contain 255 ("ignore"): such a pixel is counted as a miss for its ground-truth class
(it lowers recall and IoU, never precision), so marking pixels uncertain cannot inflate mIoU. Ground
truth 255 (void) pixels are left out. Classes absent from both ground truth and prediction are NaN
and left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE = 255


@dataclass
class ConfusionMatrix:
    """``n`` labels; rows = ground truth, columns = prediction, column ``n`` = predicted ignore."""

    n: int
    mat: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mat = np.zeros((self.n, self.n + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
        valid = gt != IGNORE
        g = gt[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        p = np.where(p == IGNORE, self.n, p)
        if g.size and (g.max() >= self.n or p.max() > self.n):
            raise ValueError(f"label out of range 0..{self.n - 1}: gt max {g.max()}, pred max {p.max()}")
        self.mat += np.bincount(g * (self.n + 1) + p, minlength=self.n * (self.n + 1)).reshape(self.n, -1)

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self.mat += other.mat
        return self

    def scores(self) -> dict[str, np.ndarray]:
        tp = np.diag(self.mat[:, : self.n]).astype(np.float64)
        gt = self.mat.sum(axis=1).astype(np.float64)  # includes predicted-ignore pixels
        pred = self.mat[:, : self.n].sum(axis=0).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            union = gt + pred - tp
            iou = np.where(union > 0, tp / union, np.nan)
            precision = np.where(pred > 0, tp / pred, np.where(gt > 0, 0.0, np.nan))
            recall = np.where(gt > 0, tp / gt, np.nan)
        return {"iou": iou, "precision": precision, "recall": recall}

    def miou(self) -> float:
        return float(np.nanmean(self.scores()["iou"]))

    def ignore_ratio(self) -> float:
        total = self.mat.sum()
        return float(self.mat[:, self.n].sum() / total) if total else 0.0

    def pixel_accuracy(self) -> float:
        total = self.mat.sum()
        return float(np.trace(self.mat[:, : self.n]) / total) if total else 0.0

    def per_class(self, names: list[str]) -> dict[str, dict[str, float | None]]:
        s = self.scores()
        return {name: {k: (None if np.isnan(s[k][i]) else round(float(s[k][i]), 4)) for k in s}
                for i, name in enumerate(names)}


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class: the mean of precision at each positive, ranked by score (ties kept in order)."""
    order = np.argsort(-scores, kind="stable")
    t = targets[order] > 0
    if not t.any():
        return float("nan")
    hits = np.cumsum(t)
    precision_at_hit = hits[t] / (np.flatnonzero(t) + 1)
    return float(precision_at_hit.mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Multi-label mAP over the classes that have at least one positive: scores, targets [N, C]."""
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    return float(np.nanmean(aps)) if not all(np.isnan(aps)) else float("nan")
