"""export.agree_with: the exported mask keeps a pixel only where the listed refiners give the same class."""

from __future__ import annotations

import json

import numpy as np

from pipeline.data import IGNORE, read_mask
from pipeline.export import consensus
from pipeline.maps.io import save_maps
from stages.cli import main
from tests.test_reliability_errors import CLASSES, TRAIN_LABELS, error_line, write_config


def test_consensus_keeps_only_agreeing_pixels():
    a = np.array([[0, 1, 2], [2, 2, 1]], np.uint8)
    b = np.array([[0, 1, 1], [2, 0, 1]], np.uint8)
    c = np.array([[0, 2, 2], [2, 2, 1]], np.uint8)
    assert consensus(a, []).tolist() == a.tolist()
    assert consensus(a, [b]).tolist() == [[0, 1, IGNORE], [2, IGNORE, 1]]
    assert consensus(a, [b, c]).tolist() == [[0, IGNORE, IGNORE], [2, IGNORE, 1]]
    assert consensus(a, [np.full_like(a, IGNORE)]).tolist() == np.full_like(a, IGNORE).tolist()


def test_export_agree_with(tiny_voc, tmp_path, capsys):
    root, run = tiny_voc(True), tmp_path / "run"
    rng = np.random.default_rng(0)
    for i, labels in TRAIN_LABELS.items():  # smooth random maps, so threshold and graphcut disagree somewhere
        maps = rng.random((len(labels), 6, 8)).repeat(4, axis=1).repeat(4, axis=2).astype(np.float32)
        save_maps(run / "maps" / "cam" / f"{i}.npz", maps, labels, CLASSES)
    cfg = write_config(tmp_path / "c.yaml", root, run, refine={"refiners": ["threshold", "graphcut"]},
                       export={"refiner": "threshold", "agree_with": ["graphcut", "threshold"]})
    assert main(["refine", "--config", str(cfg)]) == 0
    assert main(["export", "--config", str(cfg)]) == 0

    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    assert manifest["refiner"] == "threshold" and manifest["agree_with"] == ["graphcut"]  # itself dropped
    dropped = []
    for i in TRAIN_LABELS:
        t, g = (read_mask(run / "refined" / r / f"{i}.png") for r in ("threshold", "graphcut"))
        exported = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{i}.png")
        assert (exported == np.where(t == g, t, IGNORE)).all()
        assert manifest["images"][i]["ignore_ratio"] == round(float((exported == IGNORE).mean()), 4)
        dropped.append(((t != g) & (t != IGNORE)).sum())
    assert sum(dropped) > 0  # the case is not vacuous: some pixels were labelled by threshold and dropped

    line = error_line(capsys, "export", "--config", str(cfg), "--set", "export.agree_with=[crf]")
    assert "config key 'export.agree_with': 'crf' is not among the refined label sets ['threshold', 'graphcut']" in line
