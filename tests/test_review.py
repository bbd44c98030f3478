"""Confidence without GT (pipeline/confidence.py) and the review round trip (pipeline/review.py): a damaged mask ranks
below clean ones; on a tiny run the manifest and metrics carry the confidence, ``wsss review`` writes the least
confident images as a CVAT package, and a mask corrected as CVAT would save it comes back through ``wsss
import-masks``, is exported, and makes export, the segmenter and evaluate rerun, and nothing before them; bad
corrections end with one line naming the file and import nothing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import on_tiny
from PIL import Image

from pipeline.confidence import image_confidence, margin_map, review_order, summarise
from pipeline.data import read_mask
from stages.cli import main, split_set_items

SMALL = {
    "device": "cpu",
    "data": {"kind": "synthetic", "synthetic": {"n_train": 10, "n_val": 3, "size": 48, "seed": 3}},
    "classifier": {"backbone": "smallcnn", "input_size": 48, "epochs": 2, "batch_size": 4},
    "maps": {"methods": ["cam"], "flip": False},
    "refine": {"workers": "1", "refiners": ["threshold", "graphcut", "crf"]},
    "export": {"refiner": "graphcut"},
    "segmenter": {"backbone": "smallcnn", "pretrained": "none", "input_size": 48, "crop_size": 48, "epochs": 1,
                  "batch_size": 4, "upper_bound": False},
    "evaluate": {"faithfulness": {"enabled": False}},
}
STAGES = ("train_classifier", "make_maps", "refine", "export", "train_segmenter", "evaluate")


# ------------------------------------------------------------------------------------------ confidence (unit)


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 40x40 image with background and one square object (label 1): the true labels and a map of the object."""
    truth = np.zeros((40, 40), np.uint8)
    y, x = rng.integers(2, 18, 2)
    truth[y:y + 18, x:x + 18] = 1
    maps = np.where(truth == 1, 0.9, 0.1)[None].astype(np.float32) + rng.uniform(0, 0.05, (1, 40, 40))
    return truth, np.clip(maps, 0, 1).astype(np.float32)


def test_confidence_ranks_a_damaged_mask_below_clean_ones():
    rng = np.random.default_rng(0)
    scores, damaged = [], 3
    for i in range(8):
        truth, maps = _scene(rng)
        others = [truth.copy(), truth.copy()]
        others[1][0:2] = 0  # independent sets: nearly the truth
        exported = truth.copy()
        if i == damaged:  # the exported mask paints the object in the wrong place
            exported = np.roll(truth, 20, axis=1)
        c = image_confidence(exported, others, margin_map(maps, [0], True, 0.5, exported), {1: "square"})
        assert 0 <= c["confidence"] <= 1 and set(c["confidence_signals"]) == {"agreement", "margin", "certain"}
        scores.append(c["confidence"])
    assert int(np.argmin(scores)) == damaged
    assert scores[damaged] < min(s for i, s in enumerate(scores) if i != damaged) - 0.1


def test_a_class_the_mask_misses_has_confidence_zero_and_ignored_pixels_lower_it():
    truth, maps = _scene(np.random.default_rng(1))
    labels = {1: "square", 2: "circle"}
    c = image_confidence(truth, [truth], margin_map(maps, [0], True, 0.5, truth), labels)
    assert c["class_confidence"]["circle"]["confidence"] == 0.0 and c["class_confidence"]["circle"]["missing"]
    assert c["class_confidence"]["square"]["agreement"] == 1.0
    half = truth.copy()
    half[:20] = 255
    assert image_confidence(half, [truth], margin_map(maps, [0], True, 0.5, half), labels)["confidence"] < \
        c["confidence"]
    # one candidate (no background, one class): nothing to confuse, margin 1; no other set: no agreement
    sky = np.zeros((4, 4), np.uint8)
    alone = image_confidence(sky, [], margin_map(np.zeros((1, 4, 4), np.float32), [0], False, 0.5, sky), {0: "sky"})
    assert alone["confidence"] == 1.0 and alone["confidence_signals"]["agreement"] is None


def test_summary_and_review_order_leave_corrected_images_out():
    per_image = {"a": {"confidence": 0.9, "class_confidence": {"cat": {"confidence": 0.9}}},
                 "b": {"confidence": 0.2, "class_confidence": {"cat": {"confidence": 0.1}, "dog": {"confidence": 0.3}}},
                 "c": {"confidence": 1.0, "class_confidence": {}, "corrected": True},
                 "d": {"confidence": 0.5, "class_confidence": {"dog": {"confidence": 0.7}}}}
    s = summarise(per_image, ["cat", "dog", "sofa"])
    assert s["per_class"] == {"cat": 0.5, "dog": 0.5} and s["corrected"] == 1 and s["mean"] == round(1.6 / 3, 4)
    assert review_order({"images": per_image}) == ["b", "d", "a"]


# ------------------------------------------------------------------------------------------ the round trip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("review")
    cfg = {**SMALL, "run_dir": str(base / "run"), "data": {**SMALL["data"], "root": str(base / "data")}}
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    for stage in STAGES:
        assert main([stage, "--config", str(path)]) == 0, stage
    return base / "run", path


def _done(run: Path) -> dict[str, dict]:
    return {p.name.removesuffix(".done.json"): json.loads(p.read_text()) for p in run.glob("*.done.json")}


def test_manifest_and_metrics_carry_the_confidence(tiny_run):
    run, _ = tiny_run
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    assert manifest["refiner"] == "graphcut"
    for entry in manifest["images"].values():
        assert 0 <= entry["confidence"] <= 1 and entry["confidence_signals"]["agreement"] is not None
        assert set(entry["class_confidence"]) == set(entry["classes"])
    summary = manifest["confidence"]
    assert summary["per_class"] and all(0 <= v <= 1 for v in summary["per_class"].values())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["confidence"]["per_class"] == summary["per_class"]
    assert metrics["confidence"]["exported"] == "graphcut"
    assert set(metrics["confidence"]["iou"]) == set(summary["per_class"])  # GT: the exported set's IoU beside it


def _edit_as_cvat_would(package: Path, image_id: str, out: Path, colour: tuple[int, int, int]) -> np.ndarray:
    """CVAT's export of the package after an edit: the same layout, SegmentationClass/<id>.png in RGB; here the
    image's top half painted in ``colour``. Returns the RGB mask."""
    shutil.copytree(package, out)
    rgb = np.asarray(Image.open(out / "SegmentationClass" / f"{image_id}.png").convert("RGB")).copy()
    rgb[: rgb.shape[0] // 2] = colour
    Image.fromarray(rgb).save(out / "SegmentationClass" / f"{image_id}.png")
    return rgb


def test_review_import_export_round_trip(tiny_run, tmp_path):
    run, path = tiny_run
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    assert main(["review", "--config", str(path), "--limit", "3", "--out", str(tmp_path / "rv")]) == 0
    rows = list(csv.DictReader((tmp_path / "rv" / "worklist.csv").open()))
    assert [r["image"] for r in rows] == review_order(manifest)[:3]
    confidences = [float(r["confidence"]) for r in rows]
    assert confidences == sorted(confidences) and confidences[-1] <= min(
        v["confidence"] for i, v in manifest["images"].items() if i not in {r["image"] for r in rows})
    package = tmp_path / "rv" / "cvat"
    assert (package / "labelmap.txt").is_file() and (tmp_path / "rv" / "cvat.zip").stat().st_size > 0
    assert sorted(p.stem for p in (package / "SegmentationClass").glob("*.png")) == sorted(r["image"] for r in rows)

    labelmap = dict(line.split(":")[:2] for line in (package / "labelmap.txt").read_text().splitlines()[1:])
    first = rows[0]["image"]
    cls = manifest["images"][first]["classes"][0]
    colour = tuple(int(v) for v in labelmap[cls].split(","))
    _edit_as_cvat_would(package, first, tmp_path / "from_cvat", colour)
    before = _done(run)
    assert main(["import-masks", "--config", str(path), "--set", f"run_dir={run}", str(tmp_path / "from_cvat")]) == 0
    fixed = read_mask(run / "corrections" / f"{first}.png")
    classes = json.loads((run / "pseudo_masks" / "manifest.json").read_text())["classes"]
    label = classes.index(cls) + 1  # the synthetic set has a background class
    assert (fixed[: fixed.shape[0] // 2] == label).all()
    assert len(list((run / "corrections").glob("*.png"))) == 3  # the package's three masks, two unchanged

    for stage in STAGES:
        assert main([stage, "--config", str(path)]) == 0, stage
    after = _done(run)
    for stage in ("train_classifier", "make_maps", "refine"):
        assert after[stage] == before[stage], stage  # skipped: same fingerprint, same recorded time
    for stage in ("export", "train_segmenter", "evaluate"):
        assert after[stage]["fingerprint"] != before[stage]["fingerprint"], stage
    exported = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{first}.png")
    assert np.array_equal(exported, fixed)
    entry = json.loads((run / "pseudo_masks" / "manifest.json").read_text())["images"][first]
    assert entry["corrected"] is True and entry["confidence"] == 1.0
    assert first not in review_order(json.loads((run / "pseudo_masks" / "manifest.json").read_text()))

    # a second import of the same masks changes nothing: export stays up to date
    assert main(["import-masks", "--config", str(path), str(tmp_path / "from_cvat")]) == 0
    assert main(["export", "--config", str(path)]) == 0
    assert _done(run)["export"] == after["export"]


def test_set_takes_its_items_and_leaves_the_folder():
    assert split_set_items(["import-masks", "--set", "a=1", "b.c=[1, 2]", "FOLDER", "--force"]) == \
        ["import-masks", "--set=a=1", "--set=b.c=[1, 2]", "FOLDER", "--force"]
    assert split_set_items(["all", "--set", "a=1", "--set", "run_dir=/x", "--config", "c.yaml"]) == \
        ["all", "--set=a=1", "--set=run_dir=/x", "--config", "c.yaml"]
    assert split_set_items(["all", "--set", "oops"]) == ["all", "--set=oops"]  # then: expected key=value


def test_review_clamps_the_limit_and_needs_an_export(tiny_run, tmp_path, capsys):
    run, path = tiny_run
    assert main(["review", "--config", str(path), "--limit", "999", "--out", str(tmp_path / "all")]) == 0
    rows = list(csv.DictReader((tmp_path / "all" / "worklist.csv").open()))
    n = len(json.loads((run / "pseudo_masks" / "manifest.json").read_text())["images"])
    corrected = len(list((run / "corrections").glob("*.png"))) if (run / "corrections").is_dir() else 0
    assert len(rows) == n - corrected > 0
    empty = tmp_path / "c.yaml"
    empty.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "run_dir": str(tmp_path / "nothing")}))
    capsys.readouterr()
    assert main(["review", "--config", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json: no exported pseudo-masks" in err[0] and "run the export stage" in err[0]


def _bad(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    Image.fromarray(array).save(p)
    return p


@pytest.mark.parametrize("case", ["unknown image", "wrong size", "bad value", "unknown colour"])
def test_a_bad_correction_ends_with_one_line_and_imports_nothing(tiny_run, tmp_path, capsys, case):
    run, path = tiny_run
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    ids = sorted(manifest["images"])
    h, w = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{ids[0]}.png").shape
    folder = tmp_path / "fix"
    _bad(folder, f"{ids[0]}.png", np.zeros((h, w), np.uint8))  # a good one, listed first
    bad = {"unknown image": lambda: _bad(folder, "zz_not_an_image.png", np.zeros((h, w), np.uint8)),
           "wrong size": lambda: _bad(folder, f"{ids[1]}.png", np.zeros((h + 1, w), np.uint8)),
           "bad value": lambda: _bad(folder, f"{ids[1]}.png", np.full((h, w), 77, np.uint8)),
           "unknown colour": lambda: _bad(folder, f"{ids[1]}.png", np.full((h, w, 3), (1, 2, 3), np.uint8))}[case]()
    corrections = run / "corrections"
    before = sorted((p.name, p.read_bytes()) for p in corrections.glob("*.png")) if corrections.is_dir() else []
    capsys.readouterr()
    assert main(["import-masks", "--config", str(path), str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0], err
    expected = {"unknown image": "names no image of the run", "wrong size": "differs from the upright image",
                "bad value": "values [77] are no label", "unknown colour": "colour (1, 2, 3)"}[case]
    assert expected in err[0]
    after = sorted((p.name, p.read_bytes()) for p in corrections.glob("*.png")) if corrections.is_dir() else []
    assert after == before  # the good file was not imported either


def test_palette_masks_import_as_label_indices_and_a_foreign_labelmap_is_refused(tiny_run, tmp_path, capsys):
    from pipeline.runfolder import save_label_png

    run, path = tiny_run
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    image_id = sorted(manifest["images"])[-1]
    h, w = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{image_id}.png").shape
    mask = np.zeros((h, w), np.uint8)
    mask[:, : w // 2] = 2
    mask[0] = 255
    save_label_png(tmp_path / "flat" / f"{image_id}.png", mask)  # pseudo_masks' own format: indices
    assert main(["import-masks", "--config", str(path), str(tmp_path / "flat")]) == 0
    assert np.array_equal(read_mask(run / "corrections" / f"{image_id}.png"), mask)

    cvat = tmp_path / "cvat"
    _bad(cvat / "SegmentationClass", f"{image_id}.png", np.zeros((h, w, 3), np.uint8))
    (cvat / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\ntree:9,9,9::\n")
    capsys.readouterr()
    assert main(["import-masks", "--config", str(path), str(cvat)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labelmap.txt: labels ['tree'] are not classes of the dataset" in err[0]
