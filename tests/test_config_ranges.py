"""Values that make no sense are refused, through the CLI, with one line naming the key and before anything is
written; every numeric key has a range; a folder dataset without splits/ trains on a seeded hold-out."""

from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import CHOICES, RANGES, Config, config_from_dict, load_config
from pipeline.data import load_dataset
from pipeline.data.folder import held_out
from stages.cli import main


def _numeric_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _numeric_keys(tp, prefix + f.name + ".")
            continue
        args = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
        args = [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in args]
        if any(a in (int, float) for a in args):
            keys.append(prefix + f.name)
    return keys


def test_every_numeric_key_has_a_range_and_every_range_a_key():
    keys = _numeric_keys()
    assert sorted(k for k in keys if k not in RANGES) == []
    assert sorted(k for k in RANGES if k not in keys) == []
    assert set(CHOICES) <= set(RANGES)


def test_the_defaults_pass_and_each_boundary_is_where_it_says():
    config_from_dict({})
    config_from_dict({"refine": {"threshold": {"fg": 1.0, "bg": 0.0}}, "classifier": {"epochs": 1}})
    with pytest.raises(Exception, match=r"'refine.threshold.fg': expected a number in \[0, 1\], got 1.01"):
        config_from_dict({"refine": {"threshold": {"fg": 1.01}}})
    with pytest.raises(Exception, match="'data.val_fraction': expected a number >= 0 and < 1, got 1.0"):
        config_from_dict({"data": {"val_fraction": 1.0}})


BAD = [
    ("classifier.epochs=0", "config key 'classifier.epochs': expected an integer >= 1, got 0"),
    ("classifier.lr=-0.01", "config key 'classifier.lr': expected a number > 0, got -0.01"),
    ("classifier.batch_size=0", "config key 'classifier.batch_size': expected an integer >= 1, got 0"),
    ("segmenter.epochs=0", "config key 'segmenter.epochs': expected an integer >= 1, got 0"),
    ("refine.graphcut.fg_quantile=1.5", "config key 'refine.graphcut.fg_quantile': expected a number in [0, 1], "
     "got 1.5"),
    ("maps.scales=[1.0, 0]", "config key 'maps.scales': expected items > 0, got [1.0, 0.0]"),
    ("maps.scales=[]", "config key 'maps.scales': expected a list of at least one value, got []"),
    ("refine.workers=0", "config key 'refine.workers': expected auto or an integer >= 1, got '0'"),
    ("refine.refiners=[grapcut]", "config key 'refine.refiners': unknown refiner 'grapcut'; expected one of"),
    ("segmenter.output_stride=12", "config key 'segmenter.output_stride': expected one of 8, 16, null, got 12"),
]


@pytest.mark.parametrize(("setting", "message"), BAD)
def test_a_value_out_of_range_is_one_line_naming_the_key(tmp_path, capsys, setting, message):
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run), "data": {"root": str(tmp_path / "data")}}))
    assert main(["all", "--config", str(config), "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {config}: {message}"), err
    assert not run.exists() and not (tmp_path / "data").exists()  # refused before anything was written


def test_every_set_flag_counts(tmp_path, capsys):
    """``--set a=1 --set b=2`` applies both: the bad value of the first --set is refused, not dropped."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"root": str(tmp_path / "data")}}))
    missing = ["--set", "data.kind=voc"]  # alone: fails at once on the missing dataset folder
    assert main(["all", "--config", str(config), "--set", "classifier.epochs=0", *missing]) == 2
    assert "config key 'classifier.epochs'" in capsys.readouterr().err
    assert main(["all", "--config", str(config), *missing, "--set", "classifier.lr=-1"]) == 2
    assert "config key 'classifier.lr'" in capsys.readouterr().err


def _folder_dataset(root, n: int = 20) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = rng.integers(0, 60, (48, 48, 3), dtype=np.uint8)
        cls = ["cat", "dog"][i % 2]
        img[10:38, 10:38, i % 2] = 220
        Image.fromarray(img).save(root / "images" / f"p{i:02d}.jpg")
        rows.append(f"p{i:02d}.jpg,{cls}")
    (root / "labels.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    (root / "classes.txt").write_text("cat\ndog\n")


def test_a_folder_dataset_without_splits_trains_on_a_seeded_hold_out(tmp_path, caplog):
    root = tmp_path / "photos"
    _folder_dataset(root)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "device": "cpu",
        "data": {"kind": "folder", "root": str(root), "background": False},
        "classifier": {"backbone": "smallcnn", "pretrained": "none", "input_size": 32, "epochs": 1,
                       "batch_size": 4}}))
    with caplog.at_level(logging.INFO):
        assert main(["train_classifier", "--config", str(config)]) == 0

    data = load_config(config).data
    train, val, every = (load_dataset(data, s) for s in ("train", "val", "all"))
    ids = {s: [x.id for x in ds.samples] for s, ds in (("train", train), ("val", val), ("all", every))}
    assert 1 <= len(ids["val"]) <= 5  # about 10% of 20
    assert set(ids["train"]).isdisjoint(ids["val"]) and set(ids["train"]) | set(ids["val"]) == set(ids["all"])
    n = len(ids["val"])
    assert f"{n} of 20 images held out for validation (data.val_fraction 0.1): {', '.join(sorted(ids['val']))}" \
        in caplog.text
    log = yaml.safe_load((tmp_path / "run" / "train_log.json").read_text())
    assert "val_map" in log[-1]  # validated on the hold-out
    # the same ids every time, and an image keeps its side when others are added
    assert held_out([f"p{i:02d}" for i in range(20)], 0.1) == set(ids["val"])
    more = held_out([f"p{i:03d}" for i in range(400)], 0.1)
    assert 20 <= len(more) <= 60
    assert held_out([f"p{i:03d}" for i in range(200)], 0.1) == {i for i in more if int(i[1:]) < 200}


def test_a_folder_dataset_without_a_hold_out_names_the_keys(tmp_path, capsys):
    root = tmp_path / "photos"
    _folder_dataset(root, n=4)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "device": "cpu",
                                      "data": {"kind": "folder", "root": str(root), "background": False,
                                               "val_fraction": 0.0},
                                      "classifier": {"backbone": "smallcnn", "pretrained": "none"}}))
    assert main(["train_classifier", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {root / 'splits' / 'val.txt'}: split file not found, and data.val_fraction is 0: no "
                   "images are held out; raise data.val_fraction or set data.val_split: \"\""]


def test_a_config_extends_another_and_states_only_what_differs(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("name: a\nclassifier: {epochs: 3, lr: 0.01}\n"
                                              "maps: {scales: [1.0, 2.0]}\n")
    (tmp_path / "b.yaml").write_text("extends: base/a.yaml\nname: b\nclassifier: {epochs: 5}\nmaps: {scales: [1.5]}\n")
    (tmp_path / "c.yaml").write_text("extends: b.yaml\nclassifier: {batch_size: 4}\n")
    cfg = load_config(tmp_path / "c.yaml", {"classifier.lr": 0.02})
    assert cfg.name == "b" and cfg.maps.scales == [1.5]  # a list replaces
    assert (cfg.classifier.epochs, cfg.classifier.lr, cfg.classifier.batch_size) == (5, 0.02, 4)  # sections merge
    assert cfg.classifier.backbone == "tf_efficientnet_lite0"  # the rest: the recipe's defaults
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(Exception, match="extends itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "gone.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(Exception, match=r"gone.yaml: extends .*nowhere.yaml, which is not found"):
        load_config(tmp_path / "gone.yaml")


def test_the_shipped_configs_state_their_data_and_what_differs():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        load_config(path)  # each is valid
        assert len(path.read_text().splitlines()) <= 40, path
    assert len(Path(__file__).resolve().parents[1].joinpath("configs/msrc21.yaml").read_text().splitlines()) <= 10
