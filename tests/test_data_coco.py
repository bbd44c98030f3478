"""data.kind: coco (pipeline/data/coco.py): a tiny COCO instances file written here, its image-level labels, its
GT masks against pycocotools' own decoding, and the one-line errors of a broken file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.data import load_dataset, read_mask
from pipeline.errors import DataError

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
            else:
                mine = mask == label_of[a["category_id"]]
                assert (mine & m).sum() / (mine | m).sum() > 0.85, a["id"]  # polygons: two rasterisers
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


def test_a_broken_coco_file_fails_with_one_line_naming_the_file_and_entry(tmp_path):
    path = tmp_path / "coco" / "annotations" / "instances_train.json"

    def missing_image(d):
        d["images"][1]["file_name"] = "gone.jpg"

    def unknown_category(d):
        d["annotations"][3]["category_id"] = 5

    def odd_polygon(d):
        d["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0, 5.0]]

    def rle_size(d):
        d["annotations"][1]["segmentation"]["size"] = [W, H]

    def rle_counts(d):
        d["annotations"][2]["segmentation"]["counts"] = [5, 7]

    assert _broken(tmp_path, missing_image) == (f"{path}: image 12 (gone.jpg): {path.parents[1] / 'train' / 'gone.jpg'}"
                                                " not found (data.coco.images)")
    assert _broken(tmp_path, unknown_category) == (f"{path}: annotation 4: category_id 5 is not among the categories"
                                                   " (ids 3, 7, 18)")
    assert _broken(tmp_path, odd_polygon) == (f"{path}: annotation 1: malformed segmentation: a polygon of 5 numbers "
                                              "(x, y pairs, at least 3 points)")
    assert _broken(tmp_path, rle_size).startswith(f"{path}: annotation 2: malformed segmentation: an RLE of size [40,")
    assert _broken(tmp_path, rle_counts) == (f"{path}: annotation 3: malformed segmentation: an invalid RLE (its run "
                                             f"lengths cover 12 pixels, not {H}x{W} = {H * W})")
    cfg = config_from_dict({"data": {"kind": "coco", "root": str(tmp_path / "none")}})
    with pytest.raises(DataError, match=r"none/annotations/instances_train.json: COCO annotations file not found"):
        load_dataset(cfg.data, "train")


def test_rle_strings_round_trip_through_pycocotools():
    from pycocotools import mask as mask_utils

    from pipeline.rle import decode_rle, encode_rle

    rng = np.random.default_rng(1)
    for shape in [(1, 1), (7, 5), (64, 48)]:
        m = rng.random(shape) > 0.6
        m[0, 0] = True  # a first run of ones: a zero-length first count
        ours = encode_rle(m)
        assert ours["counts"] == mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
        np.testing.assert_array_equal(decode_rle(ours), m)
        assert (mask_utils.decode({"size": ours["size"], "counts": ours["counts"].encode()}) == m).all()
