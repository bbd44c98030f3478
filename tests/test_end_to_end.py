"""One end-to-end run of every stage on a tiny synthetic set, scored against its ground truth."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from conftest import on_tiny

from pipeline.data.voc import read_voc
from stages.cli import main

pytestmark = pytest.mark.slow  # each test reads the module's run of every stage

TINY = {
    "data": {"kind": "synthetic", "synthetic": {"n_train": 160, "n_val": 40, "size": 112, "seed": 3}},
    "classifier": {"backbone": "tf_efficientnet_lite0", "pretrained": "packaged", "input_size": 112, "epochs": 6,
                   "batch_size": 16, "lr": 0.001, "backbone_lr_mult": 0.3},
    "maps": {"scales": [1.0, 1.5], "flip": True},
    "refine": {"workers": "2", "threshold": {"fg": 0.6, "bg": 0.45}},
    "segmenter": {"input_size": 112, "crop_size": 112, "epochs": 3, "batch_size": 8, "backbone_lr_mult": 1.0},
}

# The walk's gain: the walked maps must beat the raw maps by MAPS_GAIN mIoU, and graphcut on the walked maps must
# beat graphcut on the raw ones (the masks' gain on this tiny set is small and varies with the CPU's float sums:
# docs/experiments.md#the-affinity-test-on-the-tiny-run).
MAPS_GAIN = 0.03


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = {**TINY, "run_dir": str(root / "run"), "data": {**TINY["data"], "root": str(root / "data")}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    assert main(["all", "--config", str(path)]) == 0
    return root / "run", path


def test_end_to_end_beats_baselines(tiny_run):
    run, _ = tiny_run
    metrics = json.loads((run / "metrics.json").read_text())
    best_baseline = max(b["miou"] for b in metrics["baselines"].values())
    assert metrics["classifier"]["val_map"] > 0.5
    assert metrics["maps"]["cam"]["miou"] > best_baseline + 0.1
    pseudo = {name: m["miou"] for name, m in metrics["pseudo_masks"].items()}
    assert set(pseudo) == {"threshold", "crf", "graphcut"}
    assert pseudo["threshold"] > best_baseline + 0.1
    assert pseudo["graphcut"] > pseudo["threshold"] + 0.05  # colour segmentation sharpens the blobs
    for key in ("train_classifier", "make_maps", "refine", "export", "train_segmenter", "train_segmenter_gt",
                "evaluate"):
        assert key in metrics["timing_s"]
    assert (run / "plots" / "sweep_cam.png").stat().st_size > 1000


def test_segmenter_on_pseudo_masks_against_its_gt_twin(tiny_run):
    run, _ = tiny_run
    metrics = json.loads((run / "metrics.json").read_text())
    seg, best_baseline = metrics["segmenter"], max(b["miou"] for b in metrics["baselines"].values())
    models = seg["models"]
    assert seg["split"] == "val"
    assert models["segmenter"]["masks"] == "pseudo" and models["segmenter_gt"]["masks"] == "gt"
    assert seg["miou"] > best_baseline + 0.1  # val images, never seen in training
    assert seg["upper_bound_miou"] > best_baseline + 0.1
    assert seg["ratio"] == round(seg["miou"] / seg["upper_bound_miou"], 4) and seg["ratio"] > 0.7
    log = json.loads((run / "segmenter_log.json").read_text())
    assert len(log) == 3 and log[-1]["loss"] < log[0]["loss"] and log[-1]["val_miou"] == seg["miou"]


def test_run_folder_contract(tiny_run):
    run, _ = tiny_run
    ds = read_voc(run / "pseudo_masks", "train", background=True)  # the export is a VOC dataset
    assert len(ds) == 160 and ds.classes == json.loads((run / "pseudo_masks/manifest.json").read_text())["classes"]
    with np.load(run / "maps" / "cam" / f"{ds.samples[0].id}.npz") as f:
        assert f["maps"].dtype == np.float16 and f["maps"].shape[0] == len(f["classes"])
        assert f["maps"].min() >= 0 and f["maps"].max() <= 1.0
    manifest = json.loads((run / "pseudo_masks/manifest.json").read_text())
    assert manifest["refiner"] == "graphcut"  # export.refiner auto: the best refiner that ran
    entry = manifest["images"][ds.samples[0].id]
    assert set(entry) == {"classes", "coverage", "ignore_ratio", "confidence", "confidence_signals", "class_confidence"}
    assert 0 <= entry["confidence"] <= 1 and 0 <= manifest["confidence"]["mean"] <= 1  # pipeline/confidence.py
    assert abs(sum(entry["coverage"].values()) + entry["ignore_ratio"] - 1) < 1e-2


def test_rerun_skips_up_to_date_stages(tiny_run, caplog):
    run, path = tiny_run
    before = {p.name: p.stat().st_mtime_ns for p in (run / "refined" / "threshold").iterdir()}
    caplog.set_level("INFO")
    assert main(["all", "--config", str(path)]) == 0
    assert sum("up to date, skipped" in r.getMessage() for r in caplog.records) == 9  # decouple counts too
    after = {p.name: p.stat().st_mtime_ns for p in (run / "refined" / "threshold").iterdir()}
    assert before == after


def test_affinity_walk_sharpens_the_pseudo_masks(tiny_run, tmp_path, caplog):
    """AffinityNet on a copy of the tiny run: the walked maps are refined again, exported and scored, and the
    pseudo-masks refined from the walked maps score a higher mIoU than the same refiner's on the raw maps."""
    run, path = tiny_run
    shutil.copytree(run, tmp_path / "run")
    sets = ["--set", f"run_dir={tmp_path / 'run'}", "affinity.enabled=true", "segmenter.enabled=false",
            "evaluate.faithfulness.enabled=false"]
    for stage in ("affinity", "export", "evaluate"):
        assert main([stage, "--config", str(path), *sets]) == 0
    walked = tmp_path / "run"
    metrics = json.loads((walked / "metrics.json").read_text())
    pseudo = {name: m["miou"] for name, m in metrics["pseudo_masks"].items()}
    assert set(pseudo) == {"threshold", "crf", "graphcut", "graphcut_rw"}
    assert metrics["pseudo_masks"]["graphcut_rw"]["maps"] == "cam_rw" and "cam_rw" in metrics["maps"]
    assert metrics["maps"]["cam_rw"]["miou"] > metrics["maps"]["cam"]["miou"] + MAPS_GAIN, metrics["maps"]
    assert pseudo["graphcut_rw"] > pseudo["graphcut"], pseudo  # the masks gain too, not only the maps
    manifest = json.loads((walked / "pseudo_masks/manifest.json").read_text())
    assert manifest["refiner"] == "graphcut_rw" and manifest["map_method"] == "cam_rw"  # auto: walked first
    losses = json.loads((walked / "affinity.done.json").read_text())["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    caplog.set_level("INFO")
    assert main(["affinity", "--config", str(path), *sets]) == 0
    assert any("affinity: up to date, skipped" in r.getMessage() for r in caplog.records)

