"""Tests for the synthetic dataset generator (pipeline.data.synthetic)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.data.synthetic import SYNTHETIC_CLASSES, generate, render_sample
from pipeline.errors import DataError
from pipeline.runfolder import voc_palette

N_TRAIN, N_VAL, SIZE = 12, 4, 64


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(root: Path) -> dict[str, list[str]]:
    with (root / "labels.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "labels"]
    return {r[0]: r[1].split() for r in rows[1:]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "ds"
    generate(root, n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=0)
    return root


def _best_threshold_iou(images: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Best foreground IoU of one global threshold (any of 256) on R, G, B or gray, either polarity."""
    fg = np.concatenate([m.ravel() > 0 for m in masks])
    n_fg = int(fg.sum())
    channels = [np.concatenate([im[..., c].ravel() for im in images]) for c in range(3)]
    channels.append(np.concatenate([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY).ravel() for im in images]))
    best = 0.0
    for vals in channels:
        h_fg = np.bincount(vals[fg], minlength=256)
        h_bg = np.bincount(vals[~fg], minlength=256)
        fg_le = np.concatenate([[0], np.cumsum(h_fg)])      # fg pixels with value < t, t = 0..256
        bg_le = np.concatenate([[0], np.cumsum(h_bg)])
        tp_hi, fp_hi = n_fg - fg_le, h_bg.sum() - bg_le     # predict fg where value >= t
        tp_lo, fp_lo = fg_le, bg_le                         # predict fg where value < t
        best = max(best, float(np.max(tp_hi / (n_fg + fp_hi))), float(np.max(tp_lo / (n_fg + fp_lo))))
    return best


def test_voc_palette() -> None:
    pal = voc_palette()
    assert len(pal) == 768 and all(0 <= v <= 255 for v in pal)
    assert pal[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]


def test_layout(dataset: Path) -> None:
    root = dataset
    seg = root / "ImageSets" / "Segmentation"
    train = seg.joinpath("train.txt").read_text().split()
    val = seg.joinpath("val.txt").read_text().split()
    assert len(train) == N_TRAIN and len(val) == N_VAL
    assert train[0] == "syn_00000" and val[0] == f"syn_{N_TRAIN:05d}"
    assert not set(train) & set(val)
    assert root.joinpath("classes.txt").read_text().split() == SYNTHETIC_CLASSES
    params = json.loads(root.joinpath(".complete").read_text())
    assert (params["n_train"], params["n_val"], params["size"], params["seed"]) == (N_TRAIN, N_VAL, SIZE, 0)

    labels = _labels(root)
    assert sorted(labels) == sorted(train + val)
    for sid in train + val:
        with Image.open(root / "JPEGImages" / f"{sid}.png") as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
        with Image.open(root / "SegmentationClass" / f"{sid}.png") as m:
            assert m.mode == "P" and m.size == (SIZE, SIZE)
            assert m.getpalette()[:30] == voc_palette()[:30]
            mask = np.asarray(m)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(SYNTHETIC_CLASSES) + 1))
        present = [SYNTHETIC_CLASSES[k - 1] for k in sorted(values - {0})]
        assert labels[sid] == present, sid
        assert 1 <= len(present) <= 3


def test_no_leftovers(dataset: Path) -> None:
    assert [p.name for p in dataset.parent.iterdir()] == ["ds"]


def test_deterministic(dataset: Path, tmp_path: Path) -> None:
    generate(tmp_path / "same", n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=0)
    assert _files(tmp_path / "same") == _files(dataset)
    generate(tmp_path / "other", n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=1)
    other = _files(tmp_path / "other")
    first = _files(dataset)
    assert other["JPEGImages/syn_00000.png"] != first["JPEGImages/syn_00000.png"]
    assert other["SegmentationClass/syn_00000.png"] != first["SegmentationClass/syn_00000.png"]


def test_sample_independent_of_split_sizes(dataset: Path, tmp_path: Path) -> None:
    generate(tmp_path / "small", n_train=3, n_val=2, size=SIZE, seed=0)
    small, full = _files(tmp_path / "small"), _files(dataset)
    for i in range(5):
        for folder in ("JPEGImages", "SegmentationClass"):
            key = f"{folder}/syn_{i:05d}.png"
            assert small[key] == full[key]


def test_idempotent_and_regenerates_on_change(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    generate(root, n_train=2, n_val=1, size=32, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    generate(root, n_train=2, n_val=1, size=32, seed=0)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps

    generate(root, n_train=3, n_val=1, size=32, seed=0)    # other parameters: replaced
    assert len(root.joinpath("ImageSets", "Segmentation", "train.txt").read_text().split()) == 3
    assert json.loads(root.joinpath(".complete").read_text())["n_train"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DataError):
        generate(root, n_train=1, n_val=1, size=32)
    assert (root / "notes.txt").read_text() == "keep me"


def test_render_sample_contract() -> None:
    for i in range(20):
        image, mask = render_sample(np.random.default_rng([5, i]), 48)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        assert mask.shape == (48, 48) and mask.dtype == np.uint8
        present = set(np.unique(mask).tolist()) - {0}
        assert 1 <= len(present) <= 3
        assert max(present) <= len(SYNTHETIC_CLASSES)
    image, mask = render_sample(np.random.default_rng(1), 40, ["ring", "star"])
    assert set(np.unique(mask).tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError):
        render_sample(np.random.default_rng(1), 40, ["hexagon"])


def test_visible_objects_are_large_enough() -> None:
    size = 64
    for i in range(50):
        _, mask = render_sample(np.random.default_rng([9, i]), size)
        counts = np.bincount(mask.ravel(), minlength=len(SYNTHETIC_CLASSES) + 1)[1:]
        assert all(c == 0 or c >= 0.03 * size * size for c in counts)


def test_colour_threshold_cannot_segment() -> None:
    samples = [render_sample(np.random.default_rng([11, i]), 64) for i in range(50)]
    images, masks = [s[0] for s in samples], [s[1] for s in samples]
    iou = _best_threshold_iou(images, masks)
    # measured about 0.18 (no threshold beats "everything is foreground")
    assert iou < 0.6, iou
    # even with the threshold and polarity chosen per image with the ground truth, IoU stays modest
    per_image = np.mean([_best_threshold_iou([im], [m]) for im, m in zip(images, masks, strict=True)])
    assert per_image < 0.65, per_image


def test_class_coverage() -> None:
    counts = np.zeros(len(SYNTHETIC_CLASSES))
    n = 200
    for i in range(n):
        _, mask = render_sample(np.random.default_rng([13, i]), 48)
        present = np.unique(mask)
        counts[present[present > 0] - 1] += 1
    freq = counts / n
    assert freq.min() >= 0.10, dict(zip(SYNTHETIC_CLASSES, freq.round(2).tolist(), strict=True))
