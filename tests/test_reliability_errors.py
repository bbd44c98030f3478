"""Bad input through the real CLI: each case ends in one line naming the file or key (exit status 2, no
traceback) and loses no earlier output; the awkward-but-valid inputs (image modes, EXIF rotation, images
without labels, non-ASCII paths with spaces, constant maps) run through without an error."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import on_tiny
from PIL import Image

from pipeline.config import load_config
from pipeline.data import read_image
from pipeline.data.dataset import image_shape
from pipeline.maps.io import save_maps
from pipeline.runfolder import save_label_png
from stages.cli import main
from tests.conftest import write_rgb

CLASSES = ["cat", "dog", "sofa"]
TRAIN_LABELS = {"a": [0], "b": [1, 2], "c": [0, 2]}  # tiny_voc's train split
EXIF_ORIENTATION = 0x0112


def write_config(path: Path, root: Path, run: Path, **sections) -> Path:
    """A CPU config for the tiny datasets: smallcnn, one epoch, the threshold refiner only, a tiny segmenter."""
    cfg = {"run_dir": str(run), "device": "cpu", "data": {"kind": "voc", "root": str(root)},
           "classifier": {"backbone": "smallcnn", "input_size": 32, "epochs": 1, "batch_size": 2},
           "maps": {"flip": False}, "refine": {"workers": "1", "refiners": ["threshold"]},
           "segmenter": {"backbone": "smallcnn", "pretrained": "none", "channels": 8, "atrous_rates": [1, 2, 3],
                         "input_size": 32, "crop_size": 32, "epochs": 1, "batch_size": 2}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(on_tiny(cfg), allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def voc(tiny_voc, tmp_path):
    """(dataset root, config path, run folder) of the 4-image VOC dataset with a background class."""
    root, run = tiny_voc(True), tmp_path / "run"
    return root, write_config(tmp_path / "c.yaml", root, run), run


def error_line(capsys, *argv: str) -> str:
    """Run the CLI, expect exit status 2 and one error line at the end of stderr, without a traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]  # tqdm bars end in \r
    assert "Traceback" not in err
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    return lines[-1]


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under ``run``: its bytes, or for a symbolic link its target."""
    return {str(p.relative_to(run)): str(p.readlink()).encode() if p.is_symlink() else p.read_bytes()
            for p in sorted(run.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "empty"])
def test_error_unreadable_or_truncated_image(voc, capsys, damage):
    root, cfg, _ = voc
    path = root / "JPEGImages" / "b.jpg"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "not_an_image": b"<html>oops</html>", "empty": b""}[damage])
    line = error_line(capsys, "train_classifier", "--config", str(cfg))
    assert f"{path}: unreadable image" in line


def test_error_missing_image_file(voc, capsys):
    root, cfg, _ = voc
    (root / "JPEGImages" / "c.jpg").unlink()
    line = error_line(capsys, "train_classifier", "--config", str(cfg))
    assert f"{root / 'JPEGImages' / 'c'}.*: no image with this id" in line


def _rotated_jpeg(path: Path) -> None:
    """A 32x24 (WxH) JPEG whose top rows are red, tagged 'rotate 90 degrees clockwise to display'."""
    arr = np.zeros((24, 32, 3), np.uint8)
    arr[:6] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(arr).save(path, exif=exif, quality=95)


def test_no_error_image_modes_and_exif_rotation(tmp_path):
    cases = {
        "gray.png": Image.fromarray(np.full((5, 6), 7, np.uint8), mode="L"),
        "rgba.png": Image.fromarray(np.zeros((5, 6, 4), np.uint8), mode="RGBA"),
        "palette.png": Image.fromarray(np.full((5, 6), 1, np.uint8), mode="P"),
        "deep.png": Image.fromarray(np.full((5, 6), 40000, np.uint16)),
    }
    cases["palette.png"].putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    for name, im in cases.items():
        im.save(tmp_path / name)
    images = {name: read_image(tmp_path / name) for name in cases}
    assert all(a.shape == (5, 6, 3) and a.dtype == np.uint8 for a in images.values())
    assert (images["gray.png"] == 7).all() and (images["rgba.png"] == 255).all()  # transparent over white
    assert (images["palette.png"] == (10, 20, 30)).all() and (images["deep.png"] == 255).all()

    _rotated_jpeg(tmp_path / "rot.jpg")
    rotated = read_image(tmp_path / "rot.jpg")
    assert rotated.shape == (32, 24, 3) and image_shape(tmp_path / "rot.jpg") == (32, 24)
    assert rotated[:, -4:, 0].min() > 200 and rotated[:, :4, 0].max() < 60  # the red top is now on the right


# -------------------------------------------------- awkward but valid: one end-to-end run through the CLI


AWKWARD_IDS = ["gray 1", "rgba ü", "palette", "deep 16", "rgb é", "exif rot"]  # labelled, all with GT masks


def make_awkward_dataset(root: Path) -> None:
    """A folder dataset with gray, RGBA, palette, 16-bit, RGB and EXIF-rotated images, ids with spaces and
    non-ASCII characters, and one more image without labels."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (24, 32), dtype=np.uint8), mode="L").save(root / "images" / "gray 1.png")
    Image.fromarray(rng.integers(0, 255, (24, 32, 4), dtype=np.uint8), mode="RGBA").save(root / "images" / "rgba ü.png")
    Image.fromarray(rng.integers(0, 255, (24, 32), dtype=np.uint8), mode="P").save(root / "images" / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (24, 32), dtype=np.uint16)).save(root / "images" / "deep 16.png")
    write_rgb(root / "images" / "rgb é.png", rng.integers(0, 255, (24, 32, 3)))
    _rotated_jpeg(root / "images" / "exif rot.jpg")
    write_rgb(root / "images" / "unlabelled.png", rng.integers(0, 255, (24, 32, 3)))
    for name in AWKWARD_IDS:
        mask = np.zeros((32, 24) if name == "exif rot" else (24, 32), np.uint8)  # the size the image displays at
        mask[4:12, 4:12] = 1
        save_label_png(root / "masks" / f"{name}.png", mask)
    (root / "classes.txt").write_text("cat\ndog\n", encoding="utf-8")
    rows = [f"{name},{'cat' if i % 2 else 'cat dog'}" for i, name in enumerate(AWKWARD_IDS)]
    (root / "labels.csv").write_text("image,labels\n" + "\n".join([*rows, "unlabelled.png,"]) + "\n",
                                     encoding="utf-8")


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def awkward_run(tmp_path_factory):
    """Every stage on the awkward dataset, under a non-ASCII path with spaces: (run folder, exit status,
    warnings logged)."""
    base = tmp_path_factory.mktemp("awkward")
    root, run = base / "dätä sét" / "ünï cödé", base / "rün dir"
    make_awkward_dataset(root)
    cfg = write_config(base / "cönfig.yaml", root, run, data={"kind": "folder", "root": str(root), "val_split": ""},
                       refine={"refiners": ["threshold", "graphcut"]})
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    try:
        status = main(["all", "--config", str(cfg)])
    finally:
        logging.getLogger().removeHandler(warnings)
    return run, status, warnings.messages


def test_no_error_awkward_images_under_non_ascii_paths(awkward_run):
    run, status, _ = awkward_run
    assert status == 0
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["images"]) == sorted(AWKWARD_IDS)
    for i in AWKWARD_IDS:
        size = (24, 32) if i == "exif rot" else (32, 24)  # PIL sizes are (width, height)
        assert Image.open(run / "refined" / "graphcut" / f"{i}.png").size == size
        assert len(list((run / "pseudo_masks" / "JPEGImages").glob(f"{i}.*"))) == 1
    assert json.loads((run / "metrics.json").read_text())["pseudo_masks"]["graphcut"]["miou"] >= 0


def test_bad_image_without_labels_is_skipped_warned_and_counted(awkward_run):
    run, status, warnings = awkward_run
    assert status == 0
    assert any("1 image(s) without labels skipped (e.g. unlabelled)" in w for w in warnings)
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["skipped_without_labels"] == 1 and "unlabelled" not in manifest["images"]


# ---------------------------------------------------------------------------------- dataset files


def test_error_mask_size_differs_from_image(voc, capsys):
    root, cfg, _ = voc
    mask = root / "SegmentationClass" / "b.png"
    save_label_png(mask, np.zeros((20, 20), np.uint8))
    line = error_line(capsys, "evaluate", "--config", str(cfg))
    assert f"{mask}: mask size 20x20 differs from its image 32x24" in line


@pytest.mark.parametrize(("row", "message"), [
    ("b,dog sofaa", "labels.csv:3: unknown class 'sofaa' for image 'b'; did you mean 'sofa'?"),
    ("b,dog horse", "labels.csv:3: unknown class 'horse' for image 'b'; expected one of cat, dog, sofa"),
])
def test_error_unknown_class_in_labels_csv(voc, capsys, row, message):
    root, cfg, _ = voc
    lines = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join([lines[0], lines[1], row, *lines[3:]]) + "\n")
    assert message in error_line(capsys, "train_classifier", "--config", str(cfg))


@pytest.mark.parametrize(("file", "text", "message"), [
    ("ImageSets/Segmentation/train.txt", "\n", "train.txt: the split is empty"),
    ("ImageSets/Segmentation/train.txt", "a\nb\na\n", "train.txt: duplicate image id 'a'"),
    ("labels.csv", "image,labels\na,cat\nb,dog\na,sofa\nc,cat\nd,dog\n", "labels.csv:4: duplicate image id 'a'"),
    ("labels.csv", "image,labels\na,\nb,\nc,\nd,dog\n", "labels.csv: no labelled image in this split"),
    ("labels.csv", "name,classes\na,cat\n", "labels.csv: expected the header 'image,labels'"),
])
def test_error_empty_split_duplicate_ids_and_bad_lists(voc, capsys, file, text, message):
    root, cfg, _ = voc
    (root / file).write_text(text)
    assert message in error_line(capsys, "train_classifier", "--config", str(cfg))


def test_error_dataset_file_not_utf8_or_a_folder(voc, capsys):
    root, cfg, _ = voc
    (root / "labels.csv").write_bytes("image,labels\na,cat\nb,d\xf6g\n".encode("latin-1"))
    assert f"{root / 'labels.csv'}: not UTF-8 text" in error_line(capsys, "train_classifier", "--config", str(cfg))
    (root / "labels.csv").unlink()
    (root / "classes.txt").unlink()
    (root / "classes.txt").mkdir()
    assert f"{root / 'classes.txt'}: Is a directory" in error_line(capsys, "train_classifier", "--config", str(cfg))


def test_no_error_labels_csv_with_byte_order_mark(voc):
    root, cfg, run = voc
    text = (root / "labels.csv").read_text()
    (root / "labels.csv").write_text("\ufeff" + text, encoding="utf-8")  # as spreadsheet programs save it
    assert main(["train_classifier", "--config", str(cfg)]) == 0 and (run / "classifier.pt").exists()


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("values", "overrides", "message"), [
    ({"classifier": {"epoch": 3}}, [], "unknown config key 'classifier.epoch'; did you mean 'classifier.epochs'?"),
    ({"clasifier": {}}, [], "unknown config key 'clasifier'; did you mean 'classifier'?"),
    ({}, ["maps.scale=[1.0]"], "unknown config key 'maps.scale'; did you mean 'maps.scales'?"),
    ({"classifier": {"epochs": "ten"}}, [], "config key 'classifier.epochs': expected an integer, got 'ten'"),
    ({}, ["refine.threshold.fg=high"], "config key 'refine.threshold.fg': expected a number, got 'high'"),
    ({"data": {"kind": "cityscapes"}}, [],
     "config key 'data.kind': expected one of 'synthetic' | 'voc' | 'folder' | 'coco'"),
    ({"maps": 3}, [], "config key 'maps': expected a mapping of MapsConfig fields, got 3"),
    ({"seed": 1}, ["seed.value=2"], "--set seed.value: config key 'seed' is a value, not a section"),
    ({}, ["classifier.epochs"], "--set 'classifier.epochs': expected key=value"),
    ({}, ["maps.scales=[1"], "--set 'maps.scales=[1': the value is not valid YAML"),
])
def test_invalid_config_key_or_value(tmp_path, capsys, values, overrides, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(on_tiny({"run_dir": str(tmp_path / "run"), **values})))
    assert message in error_line(capsys, "train_classifier", "--config", str(cfg), "--set", *overrides)
    assert not (tmp_path / "run").exists()  # nothing written before the config is valid


def test_no_error_numbers_in_scientific_notation(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("classifier: {lr: 1e-3, weight_decay: 5E-4}\n")  # YAML 1.1 reads both as text
    c = load_config(cfg)
    assert (c.classifier.lr, c.classifier.weight_decay) == (0.001, 0.0005)


def test_invalid_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert f"{missing}: config file not found" in error_line(capsys, "all", "--config", str(missing))
    broken = tmp_path / "broken.yaml"
    broken.write_text("classifier: {epochs: 3\n")
    assert f"{broken}: not valid YAML" in error_line(capsys, "all", "--config", str(broken))


# ------------------------------------------------------------------------------ weights, checkpoints


def test_error_missing_or_corrupt_weights_file(voc, capsys, tmp_path):
    root, _, run = voc
    missing = tmp_path / "weights.pt"
    cfg = write_config(tmp_path / "w.yaml", root, run, classifier={"pretrained": str(missing)})
    assert f"{missing}: weights file not found" in error_line(capsys, "train_classifier", "--config", str(cfg))
    missing.write_bytes(b"not a state dict")
    assert f"{missing}: not a readable PyTorch state dict" in error_line(capsys, "train_classifier", "--config",
                                                                         str(cfg))


def test_error_missing_or_corrupt_classifier_checkpoint(voc, capsys):
    _, cfg, run = voc
    line = error_line(capsys, "make_maps", "--config", str(cfg))
    assert f"{run / 'classifier.pt'}: classifier checkpoint not found (run the train_classifier stage first)" in line
    (run / "classifier.pt").write_bytes(b"PK\x03\x04 damaged")
    line = error_line(capsys, "make_maps", "--config", str(cfg))
    assert f"{run / 'classifier.pt'}: not a readable classifier checkpoint" in line
    assert not (run / "maps").exists() and not (run / "make_maps.partial.json").exists()


def test_error_classifier_trained_on_other_classes(voc, capsys):
    root, cfg, run = voc
    assert main(["train_classifier", "--config", str(cfg)]) == 0
    (root / "classes.txt").write_text("background\ncat\ndog\nsofa\nbird\n")
    line = error_line(capsys, "make_maps", "--config", str(cfg))
    assert f"{run / 'classifier.pt'}: trained on other classes than {root} has; rerun train_classifier" in line


def test_corrupt_done_marker_or_resume_state_retrains_from_epoch_one(voc, caplog):
    _, cfg, run = voc
    assert main(["train_classifier", "--config", str(cfg)]) == 0
    trained = (run / "classifier.pt").read_bytes()
    fp = json.loads((run / "train_classifier.done.json").read_text())["fingerprint"]
    (run / "train_classifier.done.json").write_text("{not json")
    (run / "train_classifier.partial.json").write_text(json.dumps({"fingerprint": fp}))  # as if interrupted ...
    (run / "classifier.resume.pt").write_bytes(b"\x80\x04 damaged")  # ... and its resume state damaged
    caplog.set_level("INFO")
    assert main(["train_classifier", "--config", str(cfg)]) == 0
    assert "classifier.resume.pt: unreadable" in caplog.text and "training starts from epoch 1" in caplog.text
    assert (run / "classifier.pt").read_bytes() == trained


def test_error_training_diverged(voc, capsys):
    _, cfg, _ = voc
    line = error_line(capsys, "train_classifier", "--config", str(cfg), "--set", "classifier.lr=1e30",
                      "classifier.epochs=4")
    assert "config key 'classifier.lr': training diverged" in line


# -------------------------------------------------------------------------------------------- maps


def write_maps(run: Path, value, class_names=CLASSES) -> None:
    """Map files for tiny_voc's train split, every map filled with ``value`` (24x32 like the images)."""
    for i, labels in TRAIN_LABELS.items():
        save_maps(run / "maps" / "cam" / f"{i}.npz", np.full((len(labels), 24, 32), value, np.float32), labels,
                  class_names)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_no_error_constant_maps_refine_export_evaluate(voc, value):
    root, _, run = voc
    cfg = write_config(run.parent / "k.yaml", root, run, refine={"refiners": ["threshold", "crf", "graphcut"]})
    write_maps(run, value)
    for stage in ("refine", "export", "evaluate"):
        assert main([stage, "--config", str(cfg)]) == 0
    for refiner in ("threshold", "crf", "graphcut"):
        for i, labels in TRAIN_LABELS.items():
            label = np.asarray(Image.open(run / "refined" / refiner / f"{i}.png"))
            assert label.shape == (24, 32) and set(np.unique(label)) <= {0, 255, *(c + 1 for c in labels)}


def test_error_nan_maps_name_the_file(voc, capsys):
    _, cfg, run = voc
    write_maps(run, 0.5)
    save_maps(run / "maps" / "cam" / "b.npz", np.full((2, 24, 32), np.nan, np.float32), [1, 2], CLASSES)
    line = error_line(capsys, "refine", "--config", str(cfg))
    assert f"{run / 'maps' / 'cam' / 'b.npz'}: the maps hold NaN or infinite values" in line


@pytest.mark.parametrize(("damage", "message"), [
    ("other_classes", "made with another class list ('bird' where the dataset has 'cat'); rerun make_maps"),
    ("truncated", "unreadable map file"),
    ("missing", "map file not found (run the make_maps stage)"),
    ("other_size", "crf: image is 32x24 but its maps are 20x20; rerun make_maps with --force"),
])
def test_error_bad_map_file(voc, capsys, damage, message):
    _, cfg, run = voc
    write_maps(run, 0.5)
    path = run / "maps" / "cam" / "c.npz"
    if damage == "other_classes":
        save_maps(path, np.zeros((2, 24, 32), np.float32), [0, 2], ["bird", "dog", "sofa"])
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "other_size":
        save_maps(path, np.zeros((2, 20, 20), np.float32), [0, 2], CLASSES)
    else:
        path.unlink()
    line = error_line(capsys, "refine", "--config", str(cfg), "--set", "refine.refiners=[crf]")
    assert f"{path}: {message}" in line


# -------------------------------------------------------------------------------------- run folder


@pytest.mark.parametrize("blocker", ["file_as_parent", "file_as_run_dir"])
def test_error_run_folder_cannot_be_written(tiny_voc, tmp_path, capsys, blocker):
    (tmp_path / "taken").write_text("a file, not a folder")
    run = tmp_path / "taken" / "run" if blocker == "file_as_parent" else tmp_path / "taken"
    cfg = write_config(tmp_path / "c.yaml", tiny_voc(True), run)
    line = error_line(capsys, "all", "--config", str(cfg))
    assert line.startswith(f"error: {run}: cannot write the run folder (")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_error_run_folder_read_only(voc, capsys):
    _, cfg, run = voc
    run.mkdir()
    run.chmod(0o555)
    try:
        assert error_line(capsys, "all", "--config", str(cfg)).startswith(f"error: {run}: cannot write the run folder")
    finally:
        run.chmod(0o755)


# -------------------------------------------------------------------------- export, earlier outputs


def test_error_export_inputs(voc, capsys):
    _, cfg, run = voc
    write_maps(run, 0.5)
    assert main(["refine", "--config", str(cfg)]) == 0
    line = error_line(capsys, "export", "--config", str(cfg), "--set", "export.refiner=crf")
    assert "config key 'export.refiner': 'crf' is not among the refined label sets ['threshold']" in line
    missing = run / "refined" / "threshold" / "a.png"
    missing.unlink()
    assert f"{missing}: refined label map not found (run the refine stage)" in error_line(
        capsys, "export", "--config", str(cfg))


def test_error_affinity_labels_from_a_refiner_that_did_not_run(voc, capsys):
    _, cfg, run = voc
    line = error_line(capsys, "affinity", "--config", str(cfg), "--set", "affinity.enabled=true")
    assert "config key 'affinity.labels_from': 'crf' is not among refine.refiners ['threshold']" in line
    assert not (run / "affinity.partial.json").exists()  # checked before anything is written
    line = error_line(capsys, "affinity", "--config", str(cfg), "--set", "affinity.enabled=true",
                      "affinity.labels_from=[threshold]", "affinity.refiners=[grabcut]")
    assert "config key 'affinity.refiners': unknown refiner 'grabcut'; expected one of" in line


@pytest.mark.parametrize("damage", ["image", "mask"])
def test_error_keeps_earlier_outputs(voc, capsys, damage):
    """A failing stage leaves every file of the earlier stages as it was (only the done markers may go)."""
    root, cfg, run = voc
    assert main(["all", "--config", str(cfg)]) == 0
    before = snapshot(run)
    if damage == "image":  # read by train_classifier, the first stage
        path, message = root / "JPEGImages" / "a.jpg", "unreadable image"
        path.write_bytes(b"broken")
    else:  # read by evaluate, the last one
        path, message = root / "SegmentationClass" / "a.png", "mask size 5x5 differs from its image 32x24"
        save_label_png(path, np.zeros((5, 5), np.uint8))
    assert f"{path}: {message}" in error_line(capsys, "all", "--config", str(cfg))
    after = snapshot(run)
    kept = {k for k in before if not k.endswith(".done.json")}
    assert {k: after.get(k) for k in kept} == {k: before[k] for k in kept}
