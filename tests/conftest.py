from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import _merged
from pipeline.runfolder import save_label_png


def write_rgb(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


@pytest.fixture
def tiny_voc(tmp_path):
    """A 4-image VOC-layout dataset; returns a function(background: bool, with_csv: bool) -> root."""

    def make(background: bool, with_csv: bool = True) -> Path:
        root = tmp_path / f"voc_bg{int(background)}_csv{int(with_csv)}"
        classes = ["cat", "dog", "sofa"]
        off = int(background)
        rng = np.random.default_rng(0)
        ids = ["a", "b", "c", "d"]
        present = {"a": [0], "b": [1, 2], "c": [0, 2], "d": [1]}
        for i in ids:
            write_rgb(root / "JPEGImages" / f"{i}.jpg", rng.integers(0, 255, (24, 32, 3)))
            mask = np.zeros((24, 32), np.uint8) if background else np.full((24, 32), present[i][0] + off, np.uint8)
            for j, c in enumerate(present[i]):
                mask[4 + 8 * j: 10 + 8 * j, 4:20] = c + off
            mask[0, 0] = 255
            save_label_png(root / "SegmentationClass" / f"{i}.png", mask)
        (root / "ImageSets/Segmentation").mkdir(parents=True)
        (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\nc\n")
        (root / "ImageSets/Segmentation/val.txt").write_text("d\n")
        (root / "classes.txt").write_text(("background\n" if background else "") + "\n".join(classes) + "\n")
        if with_csv:
            rows = [f"{i},{' '.join(classes[c] for c in present[i])}" for i in ids]
            (root / "labels.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
        return root

    return make


# The recipe's defaults (pipeline/config.py) are for real photos: EfficientNet-Lite0 with packaged weights,
# three scales, the affinity stage (graphcut and sam on the walked maps), a segmenter at 320 px with multi-scale,
# CRF-scored predictions. The tests' tiny runs start from this small CPU recipe instead, and state what they change.
TINY = {
    "classifier": {"backbone": "smallcnn", "pretrained": "none", "input_size": 128, "epochs": 12, "batch_size": 32,
                   "lr": 3e-3, "backbone_lr_mult": 1.0},
    "maps": {"scales": [1.0]},
    "affinity": {"enabled": False, "refiners": ["graphcut"]},
    "segmenter": {"frozen_stages": 0, "input_size": 256, "epochs": 10, "test_scales": [1.0], "crf": False},
}


def on_tiny(cfg: dict) -> dict:
    """``cfg`` on top of ``TINY`` (sections merge key by key, as a config's ``extends:``)."""
    return _merged(TINY, cfg)
