from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import RefineConfig, ThresholdConfig
from pipeline.data.voc import read_voc
from pipeline.maps.io import save_maps
from pipeline.refine.runner import refine_split
from pipeline.refine.threshold import threshold_labels


def test_threshold_with_background_band():
    maps = np.array([[[0.9, 0.5, 0.2, 0.1]], [[0.1, 0.1, 0.1, 0.05]]], np.float32)  # K=2, 1x4
    label = threshold_labels(maps, np.array([2, 4]), background=True, fg=0.4, bg=0.15)
    np.testing.assert_array_equal(label, [[3, 3, 255, 0]])  # class 2 -> label 3; 0.2 in the band


def test_threshold_without_background_argmax_and_margin():
    maps = np.array([[[0.9, 0.5, 0.2]], [[0.1, 0.48, 0.8]]], np.float32)
    classes = np.array([0, 5])
    np.testing.assert_array_equal(threshold_labels(maps, classes, False, fg=0), [[0, 0, 5]])
    np.testing.assert_array_equal(threshold_labels(maps, classes, False, fg=0, min_margin=0.05), [[0, 255, 5]])


@pytest.mark.parametrize("background", [True, False])
def test_refine_workers_identical_and_classes_stay_in_labels(tiny_voc, tmp_path, background):
    from PIL import Image

    root = tiny_voc(background)
    ds = read_voc(root, "train", background)
    rng = np.random.default_rng(1)
    for s in ds:
        save_maps(tmp_path / "maps" / f"{s.id}.npz", rng.random((len(s.labels), 24, 32)), list(s.labels), ds.classes)
    cfg = RefineConfig(threshold=ThresholdConfig(fg=0.5, bg=0.2, min_margin=0.1))
    outs = {}
    for workers in ("1", "2"):
        cfg.workers = workers
        refine_split("threshold", ds, tmp_path / "maps", tmp_path / f"w{workers}", cfg)
        outs[workers] = {s.id: (tmp_path / f"w{workers}" / f"{s.id}.png").read_bytes() for s in ds}
    assert outs["1"] == outs["2"]
    for s in ds:
        label = np.asarray(Image.open(tmp_path / "w1" / f"{s.id}.png"))
        allowed = {ds.label_of(c) for c in s.labels} | {255} | ({0} if background else set())
        assert set(np.unique(label)) <= allowed
