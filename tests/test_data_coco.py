"""data.kind: coco (pipeline/data/coco.py): a tiny COCO instances file written here, its image-level labels, its
GT masks against pycocotools' own decoding, and the one-line errors of a broken file."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import _merged, config_from_dict
from pipeline.data import load_dataset, read_mask
from pipeline.errors import DataError
from pipeline.evaluation import evaluate_labels, gt_masks
from pipeline.rle import decode_rle, encode_rle
from pipeline.runfolder import save_label_png
from stages.cli import main

H, W = 30, 40


def _coco(root: Path) -> dict:
    """Three images; categories with gaps in their ids, listed out of order; polygons, a compressed RLE, a crowd
    region as an uncompressed RLE, an image without annotations."""
    from pycocotools import mask as mask_utils

    (root / "train").mkdir(parents=True, exist_ok=True)
    for name in ("p.jpg", "q.png", "r.jpg"):
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "train" / name)
    blob = np.zeros((H, W), np.uint8, order="F")
    blob[2:12, 20:36] = 1
    rle = mask_utils.encode(np.asfortranarray(blob))
    crowd = np.zeros((H, W), bool)
    crowd[20:26, 2:10] = True
    runs, value, n = [], False, 0  # uncompressed RLE: column-major runs, a run of zeros first
    for v in crowd.ravel(order="F"):
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    data = {
        "images": [{"id": 11, "file_name": "p.jpg", "height": H, "width": W},
                   {"id": 12, "file_name": "q.png", "height": H, "width": W},
                   {"id": 13, "file_name": "r.jpg", "height": H, "width": W}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 18, "name": "kite"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 3, "iscrowd": 0,
             "segmentation": [[2.0, 2.0, 18.0, 2.0, 18.0, 14.0, 2.0, 14.0]]},  # a rectangle
            {"id": 2, "image_id": 11, "category_id": 18, "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
            {"id": 3, "image_id": 11, "category_id": 7, "iscrowd": 1, "segmentation": {"size": [H, W],
                                                                                      "counts": runs}},
            {"id": 4, "image_id": 12, "category_id": 7, "iscrowd": 0,
             "segmentation": [[5.0, 5.0, 35.0, 5.0, 35.0, 25.0, 5.0, 25.0]]},  # large, below ...
            {"id": 5, "image_id": 12, "category_id": 3, "iscrowd": 0,
             "segmentation": [[10.0, 10.0, 20.0, 10.0, 15.0, 20.0]]},  # ... a small triangle on it
        ],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    return data


def _cfg(root: Path, background: bool = True):
    return config_from_dict({"data": {"kind": "coco", "root": str(root), "background": background}})


def test_coco_labels_and_masks_match_pycocotools(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    root = tmp_path / "coco"
    _coco(root)
    ds = load_dataset(_cfg(root).data, "train")
    assert ds.classes == ["cat", "dog", "kite"]  # by category id: 3, 7, 18 -> contiguous 0, 1, 2
    assert [s.id for s in ds.samples] == ["p", "q"] and ds.skipped == ["r"]  # r has no annotation
    assert {s.id: s.labels for s in ds.samples} == {"p": (0, 1, 2), "q": (0, 1)}  # the crowd dog counts
    assert ds.samples[1].image_path == root / "train" / "q.png"

    coco = COCO(str(root / "annotations" / "instances_train.json"))
    label_of = {3: 1, 7: 2, 18: 3}
    for s in ds.samples:
        mask = read_mask(s.mask_path, (H, W))
        image_id = {"p": 11, "q": 12}[s.id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            if a["iscrowd"]:
                assert (mask[m] == 255).all()  # crowd = ignore
            elif isinstance(a["segmentation"], dict):
                assert (mask[m] == label_of[a["category_id"]]).all()  # RLE: exactly pycocotools' pixels
            elif a["id"] == 1:  # the rectangle, alone in its place: pycocotools' own pixels, area and box
                mine = np.asfortranarray((mask == label_of[a["category_id"]]).astype(np.uint8))
                np.testing.assert_array_equal(mine, m)
                rle = mask_utils.encode(mine)
                assert rle == mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], H, W))
                assert mask_utils.area(rle) == 16 * 12 and mask_utils.toBbox(rle).tolist() == [2, 2, 16, 12]
            else:  # the large dog under the triangle: what the triangle leaves of it; the triangle: all of it
                mine = mask == label_of[a["category_id"]]
                assert (mine & m).sum() / (mine | m).sum() > 0.85, a["id"]
        covered = np.any([coco.annToMask(a) for a in anns], axis=0)
        assert (mask[~covered] == 0).all()  # the rest is background
    q = read_mask(ds.samples[1].mask_path)
    assert (q[14, 15] == 1) and (q[7, 30] == 2)  # the small cat stays visible on the large dog


def test_without_background_unannotated_pixels_are_ignored_and_masks_follow_the_setting(tmp_path):
    root = tmp_path / "coco"
    _coco(root)
    with_bg = read_mask(load_dataset(_cfg(root).data, "train").samples[0].mask_path)
    ds = load_dataset(_cfg(root, background=False).data, "train")  # the masks are rasterised again
    mask = read_mask(ds.samples[0].mask_path)
    assert ds.num_labels == 3 and mask[0, 0] == 255 and with_bg[0, 0] == 0
    assert set(np.unique(mask)) == {0, 2, 255}  # cat = 0, kite = 2 (dog only as crowd), the rest ignored


def _broken(tmp_path: Path, change) -> str:
    root = tmp_path / "coco"
    data = _coco(root)
    data = copy.deepcopy(data)
    change(data)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    with pytest.raises(DataError) as exc:
        load_dataset(_cfg(root).data, "train")
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_a_coco_file_that_cannot_be_read_fails_with_one_line_naming_the_file_and_entry(tmp_path):
    path = tmp_path / "coco" / "annotations" / "instances_train.json"

    def missing_image(d):
        d["images"][1]["file_name"] = "gone.jpg"

    def no_file_name(d):
        del d["images"][2]["file_name"]

    def shared_name(d):
        d["categories"][2]["name"] = "dog"

    assert _broken(tmp_path, missing_image) == (f"{path}: image 12 (gone.jpg): {path.parents[1] / 'train' / 'gone.jpg'}"
                                                " not found (data.coco.images)")
    assert _broken(tmp_path, no_file_name) == f"{path}: image 13 has no 'file_name'"
    assert _broken(tmp_path, shared_name) == f"{path}: categories share the name dog"
    cfg = config_from_dict({"data": {"kind": "coco", "root": str(tmp_path / "none")}})
    with pytest.raises(DataError, match=r"none/annotations/instances_train.json: COCO annotations file not found"):
        load_dataset(cfg.data, "train")


def _pycocotools_labels(path: Path) -> dict[str, tuple[int, ...]]:
    """Each image's classes as a pycocotools user finds them: the categories of its annotations that are among the
    categories (contiguous indices by ascending id), keyed by file name stem; images without any left out."""
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    order = {c: k for k, c in enumerate(sorted(coco.getCatIds()))}
    out = {}
    for img in coco.loadImgs(coco.getImgIds()):
        cats = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))} & set(order)
        if cats:
            out[Path(img["file_name"]).stem] = tuple(sorted(order[c] for c in cats))
    return out


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "pipeline.data.coco"]


def test_a_file_of_boxes_only_gives_every_image_its_labels_and_no_gt_mask(tmp_path, caplog):
    root = tmp_path / "coco"
    data = _coco(root)
    for a in data["annotations"]:  # as detection files come: a bbox, and no segmentation or an empty one
        a["bbox"] = [1.0, 1.0, 5.0, 5.0]
        if a["id"] % 2:
            del a["segmentation"]
        else:
            a["segmentation"] = []
    path = root / "annotations" / "instances_train.json"
    path.write_text(json.dumps(data))
    ds = load_dataset(_cfg(root).data, "train")
    assert {s.id: s.labels for s in ds.samples} == _pycocotools_labels(path) == {"p": (0, 1, 2), "q": (0, 1)}
    assert all(s.mask_path is None for s in ds.samples) and ds.skipped == ["r"]
    assert not (root / "masks").exists()  # nothing to rasterise: nothing written
    assert _warnings(caplog) == [f"{path}: 2 of 2 labelled images get no GT mask (evaluate scores only those with "
                                 "one): 5 annotations without a segmentation (e.g. annotation 1)"]


def _users_file(root: Path) -> tuple[Path, dict]:
    """The three images of ``_coco`` and four more, each with one flaw among good annotations, and an annotation
    of an image the file does not list."""
    data = _coco(root)
    square = [[22.0, 4.0, 34.0, 4.0, 34.0, 16.0, 22.0, 16.0]]
    for n, name in enumerate(("s.jpg", "t.jpg", "u.jpg", "v.jpg"), start=21):
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "train" / name)
        data["images"].append({"id": n, "file_name": name, "height": H, "width": W})
    good = {"iscrowd": 0, "segmentation": square}
    data["annotations"] += [
        {"id": 31, "image_id": 21, "category_id": 7, **good},
        {"id": 32, "image_id": 21, "category_id": 3, "iscrowd": 0,  # a good polygon and a degenerate part
         "segmentation": [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0], [3.0, 3.0, 4.0, 4.0]]},
        {"id": 33, "image_id": 22, "category_id": 18, "iscrowd": 0,  # an RLE of another image's size
         "segmentation": {"size": [W, H], "counts": [5, 10, W * H - 15]}},
        {"id": 34, "image_id": 23, "category_id": 7, **good},
        {"id": 35, "image_id": 23, "category_id": 99, **good},  # a category the file does not list
        {"id": 36, "image_id": 24, "category_id": 3, "iscrowd": 0, "bbox": [1.0, 1.0, 4.0, 4.0]},  # a box only
        {"id": 37, "image_id": 999, "category_id": 3, **good},  # an image the file does not list
    ]
    path = root / "annotations" / "instances_train.json"
    path.write_text(json.dumps(data))
    return path, data


def test_bad_entries_among_good_ones_keep_every_label_and_only_sound_gt_masks(tmp_path, caplog):
    from pycocotools.coco import COCO


    clean = tmp_path / "clean"
    _coco(clean)
    want = {s.id: read_mask(s.mask_path) for s in load_dataset(_cfg(clean).data, "train").samples}
    root = tmp_path / "coco"
    path, _ = _users_file(root)
    COCO(str(path))  # pycocotools, the reader a user has, takes the file as it is
    caplog.clear()
    ds = load_dataset(_cfg(root).data, "train")
    labels = {s.id: s.labels for s in ds.samples}
    assert labels == _pycocotools_labels(path)
    assert labels == {"p": (0, 1, 2), "q": (0, 1), "s": (0, 1), "t": (2,), "u": (1,), "v": (0,)}
    masked = {s.id: read_mask(s.mask_path, (H, W)) for s in ds.samples if s.mask_path}
    assert set(masked) == {"p", "q"}  # the images whose every annotation is sound ...
    for i, mask in masked.items():
        np.testing.assert_array_equal(mask, want[i])  # ... with the masks a clean file gives
    assert sorted(p.name for p in (root / "masks" / "train").glob("*.png")) == ["p.png", "q.png"]
    assert _warnings(caplog) == [
        f"{path}: 4 of 6 labelled images get no GT mask (evaluate scores only those with one): "
        "2 annotations with a malformed segmentation (e.g. annotation 32: a polygon of 4 numbers (x, y pairs, at "
        "least 3 points)); 1 annotation of a category_id not among the categories (e.g. annotation 35: category_id "
        "99); 1 annotation without a segmentation (e.g. annotation 36); 1 annotation of an image_id not among the "
        "images, skipped (e.g. annotation 37: image_id 999)"]

    # evaluate scores the images with a GT mask and no other: perfect labels there, wrong ones elsewhere
    refined = tmp_path / "refined"
    for s in ds.samples:
        save_label_png(refined / f"{s.id}.png", masked[s.id] if s.id in masked else np.full((H, W), 3, np.uint8))
    gts = gt_masks(ds)
    assert set(gts) == {"p", "q"}
    scores = evaluate_labels(ds, gts, refined)
    assert scores["miou"] == 1.0 and scores["pixel_accuracy"] == 1.0


@pytest.mark.parametrize(("segmentation", "why"), [
    ({"size": [H, W], "counts": [5, 7]}, f"an invalid RLE (its run lengths cover 12 pixels, not {H}x{W} = {H * W})"),
    ({"size": [H, W], "counts": "0a~"}, "an invalid RLE (character '~' is not in the RLE alphabet)"),
    ({"size": [W, H], "counts": [W * H]},
     f"an RLE of size [{W}, {H}] on an image of {H}x{W} (size is [height, width])"),
    ([[1.0, 2.0, 3.0, 4.0, 5.0]], "a polygon of 5 numbers (x, y pairs, at least 3 points)"),
    ([[1.0, "2", 3.0, 4.0, 5.0, 6.0]], "a polygon that is not a list of numbers"),
    ({"counts": [H * W]}, "neither polygons nor an RLE with counts and size"),
])
def test_each_malformed_segmentation_is_named_in_the_warning(tmp_path, caplog, segmentation, why):
    root = tmp_path / "coco"
    data = _coco(root)
    data["annotations"][1]["segmentation"] = segmentation  # annotation 2, the kite of image p
    path = root / "annotations" / "instances_train.json"
    path.write_text(json.dumps(data))
    ds = load_dataset(_cfg(root).data, "train")
    assert {s.id: (s.labels, s.mask_path is not None) for s in ds.samples} == {"p": ((0, 1, 2), False),
                                                                               "q": ((0, 1), True)}
    assert _warnings(caplog) == [f"{path}: 1 of 2 labelled images get no GT mask (evaluate scores only those with "
                                 f"one): 1 annotation with a malformed segmentation (e.g. annotation 2: {why})"]


def test_rle_strings_round_trip_through_pycocotools():
    from pycocotools import mask as mask_utils


    rng = np.random.default_rng(1)
    for shape in [(1, 1), (7, 5), (64, 48)]:
        m = rng.random(shape) > 0.6
        m[0, 0] = True  # a first run of ones: a zero-length first count
        ours = encode_rle(m)
        assert ours["counts"] == mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
        np.testing.assert_array_equal(decode_rle(ours), m)
        assert (mask_utils.decode({"size": ours["size"], "counts": ours["counts"].encode()}) == m).all()


# ------------------------------------------------------------------------------- datasets/README.md's COCO 2017
README = Path(__file__).resolve().parents[1] / "datasets" / "README.md"
SHAPES = {1: "disc", 2: "block"}  # category id -> name


def _readme_coco2017() -> dict:
    """The COCO 2017 config that datasets/README.md gives, as its YAML block reads."""
    block = re.search(r"^```yaml\n(# configs/coco2017\.yaml\n.*?)^```", README.read_text(encoding="utf-8"),
                      flags=re.S | re.M)
    assert block, "datasets/README.md has no configs/coco2017.yaml block"
    return yaml.safe_load(block.group(1))


def _coco2017(root: Path) -> None:
    """COCO 2017 as it unpacks, in small: annotations/instances_{train,val}2017.json, train2017/, val2017/; on each
    48x48 image a disc (a polygon) and/or a block (a polygon), in colours of their own."""
    rng = np.random.default_rng(0)
    for split, n in (("train2017", 16), ("val2017", 6)):
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for i in range(n):
            image = rng.integers(60, 120, (48, 48, 3)).astype(np.uint8)
            name = f"{split}_{i:012d}.jpg"
            images.append({"id": 100 + i, "file_name": name, "height": 48, "width": 48})
            for cat in (1, 2) if i % 3 == 0 else ((1,) if i % 3 == 1 else (2,)):
                x, y = (6, 6) if cat == 1 else (26, 24)
                if cat == 1:
                    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
                    poly = np.stack([x + 9 + 8 * np.cos(t), y + 9 + 8 * np.sin(t)], 1)
                else:
                    poly = np.array([[x, y], [x + 16, y], [x + 16, y + 16], [x, y + 16]], float)
                colour = (230, 40, 40) if cat == 1 else (40, 40, 230)
                cv2.fillPoly(image, [np.round(poly - 0.5).astype(np.int32)], colour)
                annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": cat,
                                    "iscrowd": 0, "segmentation": [poly.ravel().round(1).tolist()]})
            Image.fromarray(image).save(root / split / name, quality=95)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": images, "annotations": annotations,
            "categories": [{"id": k, "name": v, "supercategory": "shape"} for k, v in SHAPES.items()]}))


def test_the_readme_coco_2017_config_runs_and_its_old_form_fails_before_training(tmp_path, capsys):
    readme = _readme_coco2017()
    assert readme["data"] | {"root": "-"} == {"kind": "coco", "root": "-", "background": True,
                                              "train_split": "train2017", "val_split": "val2017"}
    root, run = tmp_path / "coco", tmp_path / "run"
    _coco2017(root)
    small = {  # the run made small (as docs/api.md's example); the data and maps.split are the README's
        "run_dir": str(run), "data": {"root": str(root)},
        "classifier": {"backbone": "smallcnn", "pretrained": "none", "input_size": 48, "epochs": 2, "batch_size": 8},
        "maps": {"scales": [1.0], "flip": False},
        "refine": {"refiners": ["threshold"], "workers": "1"},
        "affinity": {"enabled": False},
        "segmenter": {"backbone": "smallcnn", "pretrained": "none", "channels": 8, "atrous_rates": [1, 2, 3],
                      "frozen_stages": 0, "input_size": 48, "crop_size": 48, "epochs": 1, "batch_size": 8,
                      "test_scales": [1.0], "crf": False, "upper_bound": False},
        "evaluate": {"faithfulness": {"enabled": False}},
    }
    old = tmp_path / "old.yaml"  # the README's config before: maps.split left at its default, train
    old.write_text(yaml.safe_dump(_merged({k: v for k, v in readme.items() if k != "maps"}, small)))
    assert main(["all", "--config", str(old)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: config key 'maps.split': split 'train': {root / 'annotations' / 'instances_train.json'} not found "
        "(data.coco.annotations, {split} standing for the split's name)"]
    assert not (run / "classifier.pt").exists()  # nothing trained

    config = tmp_path / "coco2017.yaml"
    config.write_text(yaml.safe_dump(_merged(readme, small)))
    assert main(["all", "--config", str(config)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    assert manifest["classes"] == ["disc", "block"] and len(manifest["images"]) == 16  # every train2017 image
    assert metrics["pseudo_masks"]["threshold"]["miou"] > 0  # scored against the GT masks of train2017
    assert metrics["segmenter"]["split"] == "val2017"
    assert sorted(p.name for p in (root / "masks").iterdir()) == ["train2017", "val2017"]
