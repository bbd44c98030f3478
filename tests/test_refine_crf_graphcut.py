from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.config import CRFConfig, RefineConfig, ThresholdConfig
from pipeline.data.voc import read_voc
from pipeline.maps.io import save_maps
from pipeline.refine import get_refiner
from pipeline.refine.crf import crf_band_runs, crf_labels
from pipeline.refine.runner import refine_split

pytest.importorskip("cv2")
pytest.importorskip("pydensecrf")

REFINERS = ["crf", "graphcut"]


def _scene(seed: int = 0, size: int = 80) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A textured red disc on a textured blue-green background, with noise -> (image, true mask, coarse blob).

    The blob is what a CAM gives: a blurred ellipse, shifted, too wide and too flat, max-normalised to [0, 1].
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c, r = size / 2, size / 4
    disc = (yy - c) ** 2 + (xx - c) ** 2 <= r**2
    stripes = 20 * np.sin(xx / 2.5 + yy / 4.0)[..., None]
    fg = np.array([200, 50, 40], np.float32) + stripes
    bg = np.array([60, 140, 160], np.float32) + 20 * np.sin(yy / 3.0 - xx / 5.0)[..., None]
    image = np.where(disc[..., None], fg, bg) + rng.normal(0, 12, (size, size, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    ex, ey = c + 0.15 * size, c + 0.08 * size  # shifted ...
    ellipse = ((xx - ex) / (1.45 * r)) ** 2 + ((yy - ey) / (0.7 * r)) ** 2 <= 1.0  # ... too wide, too flat
    blob = cv2.GaussianBlur(ellipse.astype(np.float32), (0, 0), size / 12)
    return image, disc, (blob / blob.max()).astype(np.float32)


def _iou(pred: np.ndarray, true: np.ndarray) -> float:
    return float((pred & true).sum() / (pred | true).sum())


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("name", REFINERS)
def test_refiner_follows_colour_edge_better_than_threshold(name, background):
    image, disc, blob = _scene()
    cfg = RefineConfig()
    if background:
        maps, classes, obj = blob[None], np.array([3]), 4  # class 3 -> label 4
    else:
        maps, classes, obj = np.stack([blob, 1.0 - blob]), np.array([2, 5]), 2  # object vs "ground"
    base = _iou(get_refiner("threshold").fn(maps, classes, image, background, cfg) == obj, disc)
    refined = _iou(get_refiner(name).fn(maps, classes, image, background, cfg) == obj, disc)
    assert refined >= base + 0.15, (name, background, base, refined)


@pytest.mark.parametrize("background", [True, False])
def test_workers_give_identical_outputs(tiny_voc, tmp_path, background):
    root = tiny_voc(background)
    ds = read_voc(root, "train", background)
    rng = np.random.default_rng(3)
    for s in ds:
        save_maps(tmp_path / "maps" / f"{s.id}.npz", rng.random((len(s.labels), 24, 32)), list(s.labels), ds.classes)
    cfg = RefineConfig(threshold=ThresholdConfig(fg=0.5, bg=0.2, min_margin=0.1))  # with an ignore band
    for name in ("threshold", *REFINERS):
        outs = {}
        for workers in ("1", "2"):
            cfg.workers = workers
            refine_split(name, ds, tmp_path / "maps", tmp_path / f"{name}{workers}", cfg)
            outs[workers] = {s.id: (tmp_path / f"{name}{workers}" / f"{s.id}.png").read_bytes() for s in ds}
        assert outs["1"] == outs["2"], name
        for s in ds:  # through the runner too, labels stay among the image's classes
            label = np.asarray(Image.open(tmp_path / f"{name}1" / f"{s.id}.png"))
            allowed = {ds.label_of(c) for c in s.labels} | {255} | ({0} if background else set())
            assert set(np.unique(label)) <= allowed, name


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("name", REFINERS)
def test_refiner_writes_only_the_image_classes(name, background):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    fn = get_refiner(name).fn
    for classes in ([4], [0, 7], [1, 2, 19], [3, 5, 8, 11], []):
        classes = np.array(classes, dtype=np.int64)
        maps = rng.random((len(classes), 30, 40)).astype(np.float32)
        label = fn(maps, classes, image, background, RefineConfig())
        assert label.dtype == np.uint8 and label.shape == (30, 40)
        allowed = {int(c) + int(background) for c in classes} | {255} | ({0} if background else set())
        assert set(np.unique(label).tolist()) <= allowed, (name, classes.tolist(), np.unique(label))


def test_crf_band_ignores_exactly_where_the_two_runs_disagree():
    image, _, blob = _scene(seed=2)
    cfg = CRFConfig(alpha_fg=4.0, alpha_bg=0.05)  # far apart: a wide band
    maps, classes = np.stack([blob, 0.6 * blob[:, ::-1]]), np.array([1, 6])
    fg_run, bg_run = crf_band_runs(maps, classes, image, cfg)
    label = crf_labels(maps, classes, image, True, cfg)
    disagree = fg_run != bg_run
    assert disagree.any() and not disagree.all()
    np.testing.assert_array_equal(label == 255, disagree)
    np.testing.assert_array_equal(label[~disagree], fg_run[~disagree])
    assert ((fg_run != 0) >= (bg_run != 0)).all()  # the foreground-confident run has the more foreground


def test_crf_without_background_is_one_run_without_a_band():
    """Without a background class every pixel is one of the image's classes: ``band`` changes nothing."""
    image, _, blob = _scene(seed=3)
    maps, classes = np.stack([blob, 1.0 - blob]), np.array([0, 1])
    banded = crf_labels(maps, classes, image, False, CRFConfig(band=True))
    plain = crf_labels(maps, classes, image, False, CRFConfig(band=False))
    assert 255 not in banded and set(np.unique(banded)) == {0, 1}
    np.testing.assert_array_equal(banded, plain)
