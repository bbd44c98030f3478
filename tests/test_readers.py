from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.data import maps_dataset, read_image, read_mask
from pipeline.data.folder import read_folder
from pipeline.data.voc import read_voc
from pipeline.errors import DataError
from tests.conftest import write_rgb


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("with_csv", [True, False])
def test_voc_reader_labels_and_label_space(tiny_voc, background, with_csv):
    root = tiny_voc(background, with_csv)
    ds = read_voc(root, "train", background)
    assert ds.classes == ["cat", "dog", "sofa"]  # a leading 'background' line is dropped
    assert [s.id for s in ds] == ["a", "b", "c"]
    assert [s.labels for s in ds] == [(0,), (1, 2), (0, 2)]
    assert ds.num_labels == 3 + int(background)
    assert ds.label_names[0] == ("background" if background else "cat")
    mask = read_mask(ds.samples[1].mask_path, (24, 32))
    assert set(np.unique(mask)) - {255} >= {ds.label_of(1), ds.label_of(2)}
    assert len(read_voc(root, "val", background)) == 1


def test_voc_reader_reads_msrc21():
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"
    if not root.exists():
        root = Path("../shared/data/msrc21")
    ds = read_voc(root, "train", background=False)
    assert len(ds) == 473 and len(ds.classes) == 21 and ds.num_labels == 21
    assert 2.0 < np.mean([len(s.labels) for s in ds]) < 3.5
    s = ds.samples[0]
    img = read_image(s.image_path)
    mask = read_mask(s.mask_path, img.shape[:2])
    assert set(np.unique(mask)) - {255} <= {ds.label_of(c) for c in s.labels}


def _folder(tmp_path, labels_csv: str, splits: dict[str, str] | None = None):
    root = tmp_path / "folder ünïcode"  # spaces and non-ASCII in paths
    for i in ("x1", "x2", "x3"):
        write_rgb(root / "images" / f"{i}.png", np.full((10, 12, 3), 100))
    (root / "masks").mkdir()
    Image.fromarray(np.ones((10, 12), np.uint8), mode="L").save(root / "masks" / "x1.png")
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "labels.csv").write_text(labels_csv)
    for name, text in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{name}.txt").write_text(text)
    return root


@pytest.mark.parametrize("background", [True, False])
def test_folder_reader(tmp_path, background):
    root = _folder(tmp_path, "image,labels\nx1.png,cat dog\nx2,dog\nx3,\n")
    ds = read_folder(root, "all", background)  # without splits/: all, or train and val (data.val_fraction)
    assert [s.id for s in ds] == ["x1", "x2"]
    assert ds.skipped == ["x3"]  # no labels: skipped and counted
    assert ds.samples[0].labels == (0, 1) and ds.samples[0].mask_path is not None
    assert ds.samples[1].mask_path is None
    assert ds.num_labels == 2 + int(background)
    train, val = ([x.id for x in read_folder(root, split, background)] for split in ("train", "val"))
    assert len(val) == 1 and sorted(train + val) == ["x1", "x2"]
    with pytest.raises(DataError, match="split file not found, and data.val_fraction is 0"):
        read_folder(root, "val", background, val_fraction=0.0)
    with pytest.raises(DataError, match=r"split file not found \(without splits/, the splits are 'train', 'val'"):
        read_folder(root, "test", background)


def test_folder_reader_splits(tmp_path):
    root = _folder(tmp_path, "image,labels\nx1,cat\nx2,dog\nx3,dog\n", {"train": "x1\nx2\n", "val": "x3\n"})
    assert [s.id for s in read_folder(root, "val", True)] == ["x3"]


def test_reader_errors_name_the_file(tmp_path):
    root = _folder(tmp_path, "image,labels\nx1,cat\nx2,horse\n")
    with pytest.raises(DataError, match=r"labels.csv:3: unknown class 'horse'"):
        read_folder(root, "train", True)
    root = _folder(tmp_path / "dup", "image,labels\nx1,cat\nx1,dog\n")
    with pytest.raises(DataError, match="duplicate image id 'x1'"):
        read_folder(root, "train", True)
    root = _folder(tmp_path / "empty", "image,labels\nx1,cat\n", {"train": "\n"})
    with pytest.raises(DataError, match="the split is empty"):
        read_folder(root, "train", True)


def test_read_image_modes_and_errors(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((5, 6), 7, np.uint8), mode="L").save(gray)
    assert read_image(gray).shape == (5, 6, 3)
    rgba = tmp_path / "a.png"
    Image.fromarray(np.zeros((5, 6, 4), np.uint8), mode="RGBA").save(rgba)
    assert (read_image(rgba) == 255).all()  # transparent over white
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((5, 6), 40000, np.uint16)).save(deep)
    assert read_image(deep).dtype == np.uint8 and read_image(deep).max() == 255
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="bad.jpg: unreadable image"):
        read_image(bad)
    m = tmp_path / "m.png"
    Image.fromarray(np.zeros((5, 6), np.uint8), mode="L").save(m)
    with pytest.raises(DataError, match="mask size 6x5 differs from its image 7x5"):
        read_mask(m, (5, 7))


def test_maps_limit_spreads_the_images_over_the_split(tiny_voc):
    root = tiny_voc(background=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\nc\nd\n")
    ids = {}
    for limit in (None, 2, 3, 9):
        cfg = config_from_dict({"data": {"kind": "voc", "root": str(root)}, "maps": {"limit": limit}})
        ids[limit] = [s.id for s in maps_dataset(cfg).samples]
    assert ids[None] == ids[9] == ["a", "b", "c", "d"]
    assert ids[2] == ["a", "c"] and ids[3] == ["a", "b", "c"]
