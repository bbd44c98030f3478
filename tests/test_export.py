"""Export (pipeline/export.py): which refined label set ``export.refiner`` picks, and the exported dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import read_mask
from pipeline.errors import ConfigError
from pipeline.export import AUTO_ORDER, auto_order, export_refiner
from pipeline.format_names import FORMAT_NAMES
from pipeline.formats import FORMATS, VOC, format_names
from pipeline.maps.io import save_maps
from stages.cli import main
from tests.test_reliability_errors import CLASSES, TRAIN_LABELS, error_line, write_config


def test_the_config_knows_exactly_the_registered_formats():
    """``pipeline.config.validate`` checks ``export.formats`` against ``pipeline/format_names.py`` (the config does
    not import the writers), so that list must be ``voc`` and the registry's, in its order."""
    assert FORMAT_NAMES == (VOC, *FORMATS) == tuple(format_names())
    assert FORMAT_NAMES == ("voc", "coco", "cvat", "hf", "mmseg", "yolo")


def test_auto_picks_the_walked_sets_first_then_graphcut_crf_threshold():
    assert AUTO_ORDER == ["sam", "graphcut", "crf", "threshold"]
    assert auto_order() == ["sam_dc_rw", "graphcut_dc_rw", "crf_dc_rw", "threshold_dc_rw", "sam_dc", "graphcut_dc",
                            "crf_dc", "threshold_dc", "sam_rw", "graphcut_rw", "crf_rw", "threshold_rw", "sam",
                            "graphcut",
                            "crf", "threshold"]
    assert export_refiner("auto", ["graphcut", "sam", "graphcut_rw", "sam_rw"]) == "sam_rw"
    assert export_refiner("auto", ["graphcut", "sam", "graphcut_rw"]) == "graphcut_rw"
    assert export_refiner("auto", ["threshold", "crf", "graphcut"]) == "graphcut"
    assert export_refiner("auto", ["threshold", "crf"]) == "crf"
    assert export_refiner("auto", ["threshold", "crf", "graphcut", "graphcut_rw"]) == "graphcut_rw"
    assert export_refiner("auto", ["graphcut", "crf_rw"]) == "crf_rw"  # any walked set before the raw ones
    assert export_refiner("auto", ["mine", "other"]) == "mine"  # none of the order ran: the first that did
    assert export_refiner("crf", ["threshold", "crf", "graphcut"]) == "crf"  # a named one as it is
    with pytest.raises(ConfigError, match="config key 'refine.refiners' is empty"):
        export_refiner("auto", [])
    with pytest.raises(ConfigError, match=r"config key 'export.refiner': 'sam' is not among the refined label sets"):
        export_refiner("sam", ["threshold"])


def test_export_copies_the_chosen_refiners_masks(tiny_voc, tmp_path, capsys):
    root, run = tiny_voc(True), tmp_path / "run"
    rng = np.random.default_rng(0)
    for i, labels in TRAIN_LABELS.items():
        maps = rng.random((len(labels), 6, 8)).repeat(4, axis=1).repeat(4, axis=2).astype(np.float32)
        save_maps(run / "maps" / "cam" / f"{i}.npz", maps, labels, CLASSES)
    cfg = write_config(tmp_path / "c.yaml", root, run, refine={"refiners": ["threshold", "graphcut"]})
    assert main(["refine", "--config", str(cfg)]) == 0
    assert main(["export", "--config", str(cfg)]) == 0

    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    assert manifest["refiner"] == "graphcut" and manifest["map_method"] == "cam"  # auto
    for i in TRAIN_LABELS:
        exported = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{i}.png")
        assert (exported == read_mask(run / "refined" / "graphcut" / f"{i}.png")).all()

    line = error_line(capsys, "export", "--config", str(cfg), "--set", "export.refiner=crf")
    assert "config key 'export.refiner': 'crf' is not among the refined label sets ['threshold', 'graphcut']" in line


def test_adding_formats_writes_only_them_and_a_misspelt_one_fails_first(tiny_voc, tmp_path, capsys):
    from pycocotools.coco import COCO

    root, run = tiny_voc(True), tmp_path / "run"
    rng = np.random.default_rng(0)
    for i, labels in TRAIN_LABELS.items():
        maps = rng.random((len(labels), 6, 8)).repeat(4, axis=1).repeat(4, axis=2).astype(np.float32)
        save_maps(run / "maps" / "cam" / f"{i}.npz", maps, labels, CLASSES)
    cfg = write_config(tmp_path / "c.yaml", root, run)
    assert main(["refine", "--config", str(cfg)]) == 0
    assert main(["export", "--config", str(cfg)]) == 0
    done = (run / "export.done.json").read_text()
    manifest = run / "pseudo_masks" / "manifest.json"
    before = manifest.stat().st_mtime_ns

    line = error_line(capsys, "export", "--config", str(cfg), "--set", "export.formats=[voc, coco, yolov8]")
    assert line == f"error: {cfg}: config key 'export.formats': unknown format 'yolov8'; did you mean 'yolo'?"
    assert not (run / "exports").exists()

    assert main(["export", "--config", str(cfg), "--set", "export.formats=[voc, coco]"]) == 0
    assert manifest.stat().st_mtime_ns == before  # the VOC export is left alone ...
    assert json.loads((run / "export.done.json").read_text())["fingerprint"] == json.loads(done)["fingerprint"]
    coco = COCO(str(run / "exports" / "coco" / "annotations" / "instances_train.json"))  # ... the segmenter's input too
    assert sorted(Path(im["file_name"]).stem for im in coco.loadImgs(coco.getImgIds())) == sorted(TRAIN_LABELS)
    marker = run / "exports" / "coco" / "export.json"
    written = marker.stat().st_mtime_ns
    assert main(["export", "--config", str(cfg), "--set", "export.formats=[voc, coco]"]) == 0
    assert marker.stat().st_mtime_ns == written  # up to date: nothing rewritten
