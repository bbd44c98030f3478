"""Confidence without GT (pipeline/confidence.py) and the review round trip (pipeline/review.py): a damaged mask ranks
below clean ones; on a tiny run the manifest and metrics carry the confidence, and ``wsss review`` writes the least
confident images as a CVAT package. The package goes through CVAT's own library, datumaro (the VOC segmentation
reader of CVAT's "Segmentation mask 1.1" import, the ``voc_segmentation`` writer of its export): untouched, it
imports nothing; edited, every mask comes back as edited, pixel for pixel, ignored pixels and masks of many regions
included; a correction is exported, and makes export, the segmenter and evaluate rerun, and nothing before them.
Indexed masks go through the folder's labelmap.txt; bad corrections end with one line naming the file and import
nothing."""

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

from pipeline.confidence import image_confidence, margin_map, review_order, summarise, unreliable_classes
from pipeline.data import SegDataset, read_mask
from pipeline.data.voc import read_voc
from pipeline.errors import DataError
from pipeline.export import export_pseudo_masks
from pipeline.review import import_masks, read_labelmap, write_review
from pipeline.runfolder import save_label_png
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


def test_confidence_of_a_tiny_mask_worked_by_hand():
    """2x3 pixels, one class (cat, label 1) and background, one other label set, the background's score 0.4."""
    exported = np.array([[0, 1, 1], [0, 1, 255]], np.uint8)
    other = np.array([[0, 1, 0], [0, 1, 1]], np.uint8)
    maps = np.array([[[0.1, 0.9, 0.6], [0.2, 0.7, 0.5]]], np.float32)
    margin = margin_map(maps, [0], True, 0.4, exported)
    # background pixels: 0.4 - cat's score; cat pixels: cat's score - 0.4; the ignored pixel: 0
    assert margin == pytest.approx(np.array([[0.4 - 0.1, 0.9 - 0.4, 0.6 - 0.4], [0.4 - 0.2, 0.7 - 0.4, 0]]), abs=1e-6)
    c = image_confidence(exported, [other], margin, {1: "cat"})
    agreement = 4 / 5  # 5 pixels labelled by both; they differ at (0, 2) only
    mean_margin = (0.3 + 0.5 + 0.2 + 0.2 + 0.3) / 5  # over the 5 labelled pixels
    certain = 5 / 6
    assert c["confidence_signals"] == pytest.approx({"agreement": agreement, "margin": mean_margin,
                                                     "certain": round(certain, 4)}, abs=1e-4)
    assert c["confidence"] == pytest.approx((agreement + mean_margin + certain) / 3, abs=1e-4)  # 0.6444
    # cat: exported at (0,1) (0,2) (1,1), the other set at (0,1) (1,1) (1,2): IoU 2 / 4; margin (0.5 + 0.2 + 0.3) / 3
    cat = c["class_confidence"]["cat"]
    assert cat["agreement"] == 0.5 and cat["margin"] == pytest.approx(1 / 3, abs=1e-4)
    assert cat["confidence"] == pytest.approx((0.5 + 1 / 3) / 2, abs=1e-4)  # 0.4167


def test_unreliable_classes_are_ranked_within_the_run():
    """Six classes seen in two images each: class means 0.9, 0.8, 0.7, 0.6, 0.3 (noisy: 0.0 and 0.6) and 0.2."""
    values = {"a": [0.9, 0.9], "b": [0.8, 0.8], "c": [0.7, 0.7], "d": [0.6, 0.6], "noisy": [0.0, 0.6],
              "low": [0.2, 0.2]}
    unreliable, quartile, median = unreliable_classes(values)
    # sorted means 0.2 0.3 0.6 0.7 0.8 0.9: the 25th percentile lies a quarter of the way from 0.3 to 0.6
    assert quartile == pytest.approx(0.3 + 0.25 * (0.6 - 0.3)) and median == pytest.approx((0.6 + 0.7) / 2)
    # noisy: 0.3 < 0.375, but its standard error is std([0, 0.6], ddof=1) / sqrt(2) = 0.3, and 0.3 + 2 * 0.3 > 0.65
    assert unreliable == ["low"]
    # the same classes scaled down (a dataset whose confidences sit lower): the same warning, no fixed cut
    assert unreliable_classes({c: [v / 3 for v in vs] for c, vs in values.items()})[0] == ["low"]
    assert unreliable_classes({c: [0.5, 0.5] for c in "abcdef"})[0] == []  # classes alike: no warning
    assert unreliable_classes({"a": [0.1]}) == ([], None, None)  # one class: nothing to rank it against


def test_summary_and_review_order_leave_corrected_images_out():
    per_image = {"a": {"confidence": 0.9, "class_confidence": {"cat": {"confidence": 0.9}}},
                 "b": {"confidence": 0.2, "class_confidence": {"cat": {"confidence": 0.1}, "dog": {"confidence": 0.3}}},
                 "c": {"confidence": 1.0, "class_confidence": {}, "corrected": True},
                 "d": {"confidence": 0.5, "class_confidence": {"dog": {"confidence": 0.7}}}}
    s = summarise(per_image, ["cat", "dog", "sofa"])
    assert s["per_class"] == {"cat": 0.5, "dog": 0.5} and s["corrected"] == 1 and s["mean"] == round(1.6 / 3, 4)
    assert s["unreliable"] == [] and s["quartile"] == s["median"] == 0.5  # two classes alike: no warning
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


# ------------------------------------------------------------------------------------------ CVAT's reader and writer


def cvat_reads(package: Path):
    """The package as CVAT's "Segmentation mask 1.1" import reads it. CVAT imports the archive with datumaro's VOC
    importer, whose Segmentation list is read by the VOC segmentation reader: ``voc_segmentation`` in the datumaro
    installed here (one mask annotation per SegmentationObject index but 0, its label the one whose labelmap.txt
    colour SegmentationClass has there)."""
    import datumaro as dm

    return dm.Dataset.import_from(str(package), "voc_segmentation")


def cvat_writes(dataset, labelmap: Path, out: Path, colours: bool = True) -> Path:
    """``dataset`` as CVAT's "Segmentation mask 1.1" export writes it: datumaro's ``voc_segmentation`` exporter with
    the task's labels and colours as its label map, and ``apply_colormap`` (RGB masks; with ``colours=False`` the
    masks are label indices in the order of the labelmap.txt it writes)."""
    label_map = {name: [rgb, [], []] for name, rgb in read_labelmap(labelmap)}
    dataset.export(str(out), "voc_segmentation", save_media=False, apply_colormap=colours, label_map=label_map)
    return out


def in_cvat(dataset, image_id: str, label_names: list[str], background: bool, shape: tuple[int, int]) -> np.ndarray:
    """What CVAT shows of an image: its mask annotations painted in z order, as label indices of the dataset
    (``ignore`` = 255); an unpainted pixel is CVAT's background (ignore in a dataset without a background class)."""
    from datumaro import AnnotationType

    names = dataset.categories()[AnnotationType.label]
    index = {n: k for k, n in enumerate(label_names)} | {"ignore": 255}
    shown = np.full(shape, 0 if background else 255, np.uint8)
    for ann in sorted(dataset.get(image_id).annotations, key=lambda a: a.z_order):
        shown[ann.image.astype(bool)] = index[names[ann.label].name]
    return shown


# A run folder with an export and its confidences, made without training: 3 photos of 40x64 whose masks hold what a
# round trip through CVAT must keep. The class names sort after "background": datumaro's VOC writer orders a label
# map given as a dict by name, and a label before a black "background" takes label id 0, which it paints for unpainted
# pixels too.
H, W = 40, 64
CLASSES = {True: ["cat", "dog", "sofa"], False: ["grass", "sky", "tree"]}


def _masks() -> dict[str, np.ndarray]:
    """Label maps of the three photos (0 is the background, or the first class without one)."""
    a = np.zeros((H, W), np.uint8)
    a[0:20:2, 0:64:2] = 1  # 320 single-pixel components: more than SegmentationObject's 254 indices
    a[24:36, 4:24] = 1
    a[24:36, 30:50] = 2
    a[24:36, 54:62] = 255  # ignored: a block and single pixels
    a[38, 0:64:3] = 255
    b = np.zeros((H, W), np.uint8)
    b[5:30, 10:40] = 2
    b[31:34] = 255
    b[36:40:2, 1:64:2] = 255
    return {"a": a, "b": b, "c": np.zeros((H, W), np.uint8)}  # c: nothing but background (or the first class)


@pytest.fixture(params=[True, False], ids=["background", "no_background"])
def hand_run(request, tmp_path) -> tuple[Path, SegDataset, Path]:
    """(run folder, its dataset, the review package of its 3 images)."""
    background = request.param
    root, run = tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    for i, mask in _masks().items():
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        save_label_png(root / "SegmentationClass" / f"{i}.png", mask)
        save_label_png(tmp_path / "refined" / f"{i}.png", mask)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\nc\n")
    names = CLASSES[background]
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    labels = {"a": names[:2], "b": [names[1]], "c": [names[2]]} if background else \
        {"a": names, "b": [names[0], names[2]], "c": [names[0]]}  # c (background): its object missed
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"{i},{' '.join(v)}\n" for i, v in labels.items()))
    ds = read_voc(root, "train", background)
    confidence = {i: {"confidence": c, "confidence_signals": {}, "class_confidence": {}}
                  for i, c in zip("abc", (0.2, 0.5, 0.8), strict=True)}
    export_pseudo_masks(ds, tmp_path / "refined", run / "pseudo_masks", "copy", confidence=confidence)
    assert write_review(run, ds, 3, tmp_path / "review") == ["a", "b", "c"]
    return run, ds, tmp_path / "review" / "cvat"


def test_cvat_reads_every_pixel_of_the_package(hand_run):
    from datumaro import AnnotationType

    _, ds, package = hand_run
    dataset = cvat_reads(package)
    assert sorted(item.id for item in dataset) == ["a", "b", "c"]
    for i, mask in _masks().items():
        assert np.array_equal(in_cvat(dataset, i, ds.label_names, ds.background, (H, W)), mask), i
    objects = np.asarray(Image.open(package / "SegmentationObject" / "a.png"))
    assert objects.max() == 254 and len(dataset.get("a").annotations) == 254  # the dots merged, none lost
    names = dataset.categories()[AnnotationType.label]
    ignored = [a for a in dataset.get("b").annotations if names[a.label].name == "ignore"]
    assert sum(int(a.image.sum()) for a in ignored) == int((_masks()["b"] == 255).sum()) > 0


def test_an_untouched_round_trip_through_cvat_imports_nothing(hand_run, tmp_path):
    run, ds, package = hand_run
    out = cvat_writes(cvat_reads(package), package / "labelmap.txt", tmp_path / "from_cvat")
    if ds.background:  # CVAT writes no mask for an image without a painted pixel, and lists it
        assert not (out / "SegmentationClass" / "c.png").exists()
        assert "c" in (out / "ImageSets" / "Segmentation" / "default.txt").read_text().split()
    done = import_masks(run, ds, out)
    assert done.corrected == [] and sorted(done.unchanged) == ["a", "b", "c"]
    assert not (run / "corrections").exists()


@pytest.mark.parametrize("colours", [True, False], ids=["rgb", "indices"])
def test_a_mask_edited_in_cvat_comes_back_as_edited(hand_run, tmp_path, colours):
    """The edits a person makes in CVAT, made on the annotations CVAT's reader gives: a class given to the ignored
    block, an object deleted, a rectangle painted over others, every object of an image erased. The import gives
    back exactly these masks, from RGB masks or from label indices in labelmap.txt's order."""
    import datumaro as dm

    run, ds, package = hand_run
    dataset = cvat_reads(package)
    names = dataset.categories()[dm.AnnotationType.label]
    label_id = {names[k].name: k for k in range(len(names))}
    unpainted = 0 if ds.background else 255
    expected = _masks()
    a = dataset.get("a")
    anns = list(a.annotations)
    block = max((x for x in anns if names[x.label].name == "ignore"), key=lambda x: int(x.image.sum()))
    target = ds.label_names[2]
    gone = max((x for x in anns if names[x.label].name == ds.label_names[1]), key=lambda x: int(x.image.sum()))
    anns = [x for x in anns if x is not block and x is not gone]
    anns.append(dm.Mask(image=block.image, label=label_id[target]))
    rect = np.zeros((H, W), bool)
    rect[10:30, 20:44] = True  # over the dots and the objects
    anns.append(dm.Mask(image=rect, label=label_id[ds.label_names[1]], z_order=1))
    dataset.put(a.wrap(annotations=anns))
    dataset.put(dataset.get("b").wrap(annotations=[]))
    expected["a"][block.image.astype(bool)] = 2
    expected["a"][gone.image.astype(bool)] = unpainted
    expected["a"][rect] = 1
    expected["b"][:] = unpainted

    out = cvat_writes(dataset, package / "labelmap.txt", tmp_path / "from_cvat", colours)
    mode = Image.open(out / "SegmentationClass" / "a.png").mode
    assert mode == ("RGB" if colours else "L")
    done = import_masks(run, ds, out)
    assert sorted(done.corrected) == ["a", "b"] and done.unchanged == ["c"]
    for i in ("a", "b"):
        assert np.array_equal(read_mask(run / "corrections" / f"{i}.png"), expected[i]), i
    assert sorted(p.name for p in (run / "corrections").iterdir()) == ["a.png", "b.png"]


def test_indexed_masks_follow_the_folders_labelmap(hand_run, tmp_path):
    """A tool that writes indexed PNGs in labelmap.txt's order (the package's: background first): index 1 is the
    first class in a dataset without a background class too, not its second, and 0 (CVAT's background) is the
    background there, ignore here."""
    run, ds, package = hand_run
    order = [name for name, _ in read_labelmap(package / "labelmap.txt")]
    assert order == ["background", *ds.classes, "ignore"]
    mask = np.zeros((H, W), np.uint8)
    mask[:, 20:] = 1  # the first class
    mask[:, 40:] = order.index("ignore")
    save_label_png(tmp_path / "tool" / "a.png", mask)
    shutil.copy(package / "labelmap.txt", tmp_path / "tool" / "labelmap.txt")
    done = import_masks(run, ds, tmp_path / "tool")
    assert done.corrected == ["a"]
    expected = np.full((H, W), 0 if ds.background else 255, np.uint8)
    expected[:, 20:] = ds.label_of(0)
    expected[:, 40:] = 255
    assert np.array_equal(read_mask(run / "corrections" / "a.png"), expected)
    mask[0, 0] = len(order)  # past the labelmap's labels
    save_label_png(tmp_path / "tool" / "a.png", mask)
    with pytest.raises(DataError, match=f"a.png: values \\[{len(order)}\\] are no label of .*labelmap.txt"):
        import_masks(run, ds, tmp_path / "tool")


# ------------------------------------------------------------------------------------------ the round trip (CLI)


def test_review_import_export_round_trip(tiny_run, tmp_path, caplog):
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

    # through CVAT without an edit: nothing imported, export up to date (--set before the folder leaves it be)
    before = _done(run)
    untouched = cvat_writes(cvat_reads(package), package / "labelmap.txt", tmp_path / "untouched")
    caplog.set_level("INFO")
    caplog.clear()
    assert main(["import-masks", "--config", str(path), "--set", f"run_dir={run}", str(untouched)]) == 0
    assert "no mask differs from the exported one, 3 unchanged" in caplog.text
    assert not (run / "corrections").exists()
    assert main(["export", "--config", str(path)]) == 0
    assert _done(run)["export"] == before["export"]

    # the first image's top half painted with one of its classes in CVAT
    import datumaro as dm

    first = rows[0]["image"]
    cls = manifest["images"][first]["classes"][0]
    dataset = cvat_reads(package)
    names = dataset.categories()[dm.AnnotationType.label]
    item = dataset.get(first)
    h, w = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{first}.png").shape
    top = np.zeros((h, w), bool)
    top[: h // 2] = True
    dataset.put(item.wrap(annotations=[*item.annotations, dm.Mask(image=top, label=names.find(cls)[0], z_order=1)]))
    caplog.clear()
    assert main(["import-masks", str(cvat_writes(dataset, package / "labelmap.txt", tmp_path / "from_cvat")),
                 "--config", str(path)]) == 0
    assert "1 corrected masks" in caplog.text and "2 unchanged" in caplog.text
    fixed = read_mask(run / "corrections" / f"{first}.png")
    classes = json.loads((run / "pseudo_masks" / "manifest.json").read_text())["classes"]
    label = classes.index(cls) + 1  # the synthetic set has a background class
    assert (fixed[: h // 2] == label).all()
    exported = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{first}.png")
    assert np.array_equal(fixed[h // 2:], exported[h // 2:])  # the rest as exported
    assert [p.stem for p in (run / "corrections").glob("*.png")] == [first]

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

    # a second import of the same masks changes nothing: the masks now equal the exported ones
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


def _listed(folder: Path, good: str, image_id: str) -> Path:
    """A CVAT export whose ImageSets list ``image_id`` without a mask (beside the mask of ``good``)."""
    (folder / "SegmentationClass").mkdir()
    shutil.move(folder / f"{good}.png", folder / "SegmentationClass" / f"{good}.png")
    listed = folder / "ImageSets" / "Segmentation" / "default.txt"
    listed.parent.mkdir(parents=True)
    listed.write_text(f"{good}\n{image_id}\n")
    return listed


@pytest.mark.parametrize("case", ["unknown image", "unknown listed image", "wrong size", "bad value", "unknown colour"])
def test_a_bad_correction_ends_with_one_line_and_imports_nothing(tiny_run, tmp_path, capsys, case):
    run, path = tiny_run
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    ids = sorted(manifest["images"])
    h, w = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{ids[0]}.png").shape
    folder = tmp_path / "fix"
    _bad(folder, f"{ids[0]}.png", np.zeros((h, w), np.uint8))  # a good one, listed first
    bad = {"unknown image": lambda: _bad(folder, "zz_not_an_image.png", np.zeros((h, w), np.uint8)),
           "unknown listed image": lambda: _listed(folder, ids[0], "zz_not_an_image"),
           "wrong size": lambda: _bad(folder, f"{ids[1]}.png", np.zeros((h + 1, w), np.uint8)),
           "bad value": lambda: _bad(folder, f"{ids[1]}.png", np.full((h, w), 77, np.uint8)),
           "unknown colour": lambda: _bad(folder, f"{ids[1]}.png", np.full((h, w, 3), (1, 2, 3), np.uint8))}[case]()
    corrections = run / "corrections"
    before = sorted((p.name, p.read_bytes()) for p in corrections.glob("*.png")) if corrections.is_dir() else []
    capsys.readouterr()
    assert main(["import-masks", "--config", str(path), str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0], err
    expected = {"unknown image": "names no image of the run",
                "unknown listed image": "default.txt: zz_not_an_image: names no image of the run",
                "wrong size": "differs from the upright image",
                "bad value": "values [77] are no label", "unknown colour": "colour (1, 2, 3)"}[case]
    assert expected in err[0]
    after = sorted((p.name, p.read_bytes()) for p in corrections.glob("*.png")) if corrections.is_dir() else []
    assert after == before  # the good file was not imported either


def test_palette_masks_import_as_label_indices_and_a_foreign_labelmap_is_refused(tiny_run, tmp_path, capsys):
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
