"""The export formats (pipeline/export.py, pipeline/formats/), each loaded by the reader its users have:
torchvision's VOCSegmentation and cv2 (VOC), pycocotools (COCO), datasets (HF); mmseg, Ultralytics and CVAT by
their published file rules, since those libraries cannot be installed beside the pipeline."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from pipeline.data.folder import read_folder
from pipeline.errors import DataError, UserError
from pipeline.export import export_pseudo_masks, write_formats
from pipeline.formats import write_cvat
from pipeline.runfolder import save_label_png, voc_palette

H, W = 40, 56  # upright size: not square, so a rotated image cannot pass for an upright one
BOX = (slice(4, 16), slice(6, 26))  # the known shape, near the top left corner
RED, GREY = (230, 20, 20), (60, 60, 60)


def _upright() -> tuple[np.ndarray, np.ndarray]:
    image = np.empty((H, W, 3), np.uint8)
    image[:] = GREY
    image[BOX] = RED
    label = np.zeros((H, W), np.uint8)
    label[BOX] = 1
    return image, label


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# stored file = the upright image transformed by the inverse of what its EXIF orientation asks a viewer to do
STORED_BY_ORIENTATION = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _damaged_inputs(folder: Path) -> dict[str, str]:
    """One file per damage, each showing the same upright image once read as the pipeline reads it; -> id: kind."""
    image, _ = _upright()
    up = Image.fromarray(image)
    kinds = {}
    folder.mkdir(parents=True)
    up.save(folder / "plain.jpg", quality=95)
    kinds["plain"] = "jpeg"
    for o, transpose in STORED_BY_ORIENTATION.items():
        up.transpose(transpose).save(folder / f"exif{o}.jpg", quality=95, exif=_exif(o))
        kinds[f"exif{o}"] = f"exif {o}"
    up.save(folder / "png.png")
    up.save(folder / "webp.webp", lossless=True)
    up.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    gray16 = np.where(_upright()[1] == 1, 60000, 9000).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    assert Image.open(folder / "gray16.png").mode.startswith("I")
    rgba = np.dstack([image, np.full((H, W), 255, np.uint8)])
    rgba[..., 3][_upright()[1] == 0] = 200  # see-through background, composited on white: still darker than red
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    kinds.update(png="png", webp="webp", cmyk="cmyk jpeg", gray16="16-bit png", rgba="rgba png")
    return kinds


def _dataset(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "photos"
    kinds = _damaged_inputs(root / "images")
    (root / "classes.txt").write_text("box\n")
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"{i},box\n" for i in kinds))
    return root, kinds


def _export(tmp_path: Path, out: Path, images: str = "link") -> tuple[dict[str, str], Path]:
    root, kinds = _dataset(tmp_path)
    ds = read_folder(root, "all", background=True)
    refined = tmp_path / "refined"
    for i in kinds:
        save_label_png(refined / f"{i}.png", _upright()[1])
    export_pseudo_masks(ds, refined, out, images)
    return kinds, root


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_the_voc_export_reads_upright_in_torchvision_and_cv2(tmp_path):
    from torchvision.datasets import VOCSegmentation

    voc = tmp_path / "VOCdevkit" / "VOC2012"  # where VOCSegmentation(root, year="2012") looks
    kinds, root = _export(tmp_path, voc)
    jpegs = voc / "JPEGImages"
    assert sorted(p.name for p in jpegs.iterdir()) == sorted(f"{i}.jpg" for i in kinds)
    assert (jpegs / "plain.jpg").is_symlink()  # an upright JPEG is linked, every other one written
    assert not any((jpegs / f"{i}.jpg").is_symlink() for i in kinds if i != "plain")
    for i in kinds:
        with Image.open(jpegs / f"{i}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.getexif().get(0x0112, 1) == 1, i

    dataset = VOCSegmentation(str(tmp_path), year="2012", image_set="train", download=False)
    assert len(dataset) == len(kinds)
    _, label = _upright()
    for k, (image, mask) in enumerate(dataset):
        i = Path(dataset.images[k]).stem
        assert image.size == mask.size == (W, H), f"{kinds[i]}: image {image.size}, mask {mask.size}"
        np.testing.assert_array_equal(np.asarray(mask), label)
        red = np.asarray(image)[..., 0] > 128  # the box is red, the rest grey (or grey on white, or dark)
        assert _iou(red, label == 1) > 0.97, kinds[i]
        bgr = cv2.imread(str(jpegs / f"{i}.jpg"))  # cv2 applies EXIF orientation: there is none left to apply
        assert bgr.shape == (H, W, 3), kinds[i]
        assert _iou(bgr[..., 2] > 128, label == 1) > 0.97, kinds[i]
        assert cv2.imread(str(voc / "SegmentationClass" / f"{i}.png")).shape[:2] == (H, W)  # (cv2 expands the palette)


def test_a_rotated_source_with_a_mask_of_the_stored_size_fails_with_one_line(tmp_path):
    root, kinds = _dataset(tmp_path)
    ds = read_folder(root, "all", background=True)
    refined = tmp_path / "refined"
    for i in kinds:
        save_label_png(refined / f"{i}.png", _upright()[1] if i != "exif6" else _upright()[1].T.copy())
    out = tmp_path / "pseudo_masks"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    with pytest.raises(DataError, match=r"exif6\.jpg: image size 56x40 differs from its refined label map 40x56"):
        export_pseudo_masks(ds, refined, out)
    assert (out / "earlier.txt").read_text() == "kept"  # the earlier export is left as it was


def test_the_voc_export_and_the_formats_place_images_alike(tmp_path, monkeypatch):
    """One place_image serves the VOC export and every format: a link to the file the source resolves to, a copy
    with export.images: copy, and one line naming the folder where links cannot be made."""
    kinds, root = _export(tmp_path, tmp_path / "pm")
    linked = tmp_path / "pm" / "JPEGImages" / "plain.jpg"
    assert linked.is_symlink() and os.readlink(linked) == str((root / "images" / "plain.jpg").resolve())
    write_formats(tmp_path / "pm", tmp_path / "exports", ["mmseg"], "link")
    placed = tmp_path / "exports" / "mmseg" / "img_dir" / "train" / "plain.jpg"
    assert placed.is_symlink() and os.readlink(placed) == str(linked.resolve())  # the dataset's file, not the link
    write_formats(tmp_path / "pm", tmp_path / "copies", ["mmseg"], "copy")
    copied = tmp_path / "copies" / "mmseg" / "img_dir" / "train" / "plain.jpg"
    assert not copied.is_symlink() and copied.read_bytes() == (root / "images" / "plain.jpg").read_bytes()

    def refuse(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", refuse)
    for write in (lambda: _export(tmp_path / "again", tmp_path / "again" / "pm"),
                  lambda: write_formats(tmp_path / "pm", tmp_path / "refused", ["coco"], "link")):
        with pytest.raises(UserError) as exc:
            write()
        assert str(exc.value).endswith(": cannot make symbolic links here (Operation not permitted); set "
                                       "export.images: copy")


# ------------------------------------------------------------------------------------------- the other formats
CLASSES = ["disc", "ring", "dot"]


def _scene(background: bool) -> dict[str, np.ndarray]:
    """Label maps with two components of one class, a ring (a hole), a one-pixel component, an ignore band."""
    off = int(background)
    a = np.full((48, 64), 0 if background else 2, np.uint8)  # without background: "dot" everywhere else
    cv2.circle(a, (12, 12), 7, 0 + off, -1)
    cv2.circle(a, (50, 36), 8, 0 + off, -1)
    cv2.circle(a, (30, 30), 10, 1 + off, -1)
    cv2.circle(a, (30, 30), 4, 0 if background else 2, -1)  # the ring's hole
    a[44:48, :] = 255  # uncertain
    b = np.full((30, 44), 0 if background else 2, np.uint8)
    b[0:12, 20:44] = 1 + off  # touches the border
    b[25, 5] = 2 + off if background else 0  # a single pixel
    return {"a": a, "b c": b}  # an id with a space: a line of the split file, not a word


def _formats(tmp_path: Path, background: bool, formats: list[str]) -> tuple[dict[str, np.ndarray], Path]:
    root = tmp_path / "data"
    scene = _scene(background)
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, label in scene.items():
        Image.fromarray(rng.integers(0, 255, (*label.shape, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"{i},disc\n" for i in scene))
    refined = tmp_path / "refined"
    for i, label in scene.items():
        save_label_png(refined / f"{i}.png", label)
    run = tmp_path / "run"
    export_pseudo_masks(read_folder(root, "all", background), refined, run / "pseudo_masks", "copy")
    wrote = write_formats(run / "pseudo_masks", run / "exports", formats, "copy", fp="abc")
    assert list(wrote) == [f for f in formats if f != "voc"]
    for f in wrote:
        assert json.loads((run / "exports" / f / "export.json").read_text())["fingerprint"] == "abc"
    return scene, run / "exports"


def _components(label: np.ndarray, value: int) -> list[np.ndarray]:
    n, comp = cv2.connectedComponents((label == value).astype(np.uint8), connectivity=8)
    return [comp == j for j in range(1, n)]


@pytest.mark.parametrize("background", [True, False])
def test_coco_decodes_in_pycocotools_to_the_label_maps(tmp_path, background):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    scene, exports = _formats(tmp_path, background, ["voc", "coco"])
    coco = COCO(str(exports / "coco" / "annotations" / "instances_train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES  # ids 1..3, no background category
    assert coco.getCatIds() == [1, 2, 3]
    off = int(background)
    for img in coco.loadImgs(coco.getImgIds()):
        i = Path(img["file_name"]).stem
        label = scene[i]
        assert (img["height"], img["width"]) == label.shape
        assert Image.open(exports / "coco" / "images" / img["file_name"]).size == (img["width"], img["height"])
        assert img["ignore_pixels"] == int((label == 255).sum())
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        for k in range(len(CLASSES)):
            want = _components(label, k + off)
            got = [coco.annToMask(a).astype(bool) for a in anns if a["category_id"] == k + 1]
            assert len(got) == len(want), (i, k)  # one annotation per connected component
            for m in got:
                assert any((m == w).all() for w in want)
        for a in anns:
            rle = a["segmentation"]
            assert isinstance(rle["counts"], str) and rle["size"] == list(label.shape) and a["iscrowd"] == 0
            assert a["area"] == int(mask_utils.area(rle)) == int(coco.annToMask(a).sum())
            assert a["bbox"] == mask_utils.toBbox(rle).tolist()
            # our string is the one pycocotools itself writes for the same mask
            assert mask_utils.encode(np.asfortranarray(coco.annToMask(a)))["counts"].decode() == rle["counts"]
    n_components = sum(len(_components(lab, k + off)) for lab in scene.values() for k in range(len(CLASSES)))
    assert len(coco.getAnnIds()) == n_components
    # the rectangle of "b c" (rows 0..11, columns 20..43 of 30x44; "ring"), in numbers: its run lengths, column by
    # column, are 20 empty columns, then 12 set and 18 clear pixels in each of the 24 columns
    b = next(img for img in coco.loadImgs(coco.getImgIds()) if img["file_name"] == "b c.jpg")
    (rect,) = coco.loadAnns(coco.getAnnIds(imgIds=[b["id"]], catIds=[2]))
    runs = mask_utils.frPyObjects({"size": [30, 44], "counts": [20 * 30] + [12, 18] * 24}, 30, 44)
    assert rect["segmentation"] == {"size": [30, 44], "counts": runs["counts"].decode()}
    assert rect["area"] == 12 * 24 == mask_utils.area(runs) and rect["bbox"] == [20, 0, 24, 12]
    assert rect["iscrowd"] == 0 and rect["category_id"] == 2


def test_hf_loads_offline_with_load_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_from_disk

    scene, exports = _formats(tmp_path, True, ["hf"])
    dd = load_from_disk(str(exports / "hf"))
    assert list(dd) == ["train"] and len(dd["train"]) == len(scene)
    assert json.loads((exports / "hf" / "id2label.json").read_text()) == {"0": "background", "1": "disc",
                                                                         "2": "ring", "3": "dot"}
    assert json.loads(dd["train"].info.description)["id2label"]["3"] == "dot"
    for row in dd["train"]:
        label = np.asarray(row["label"])
        np.testing.assert_array_equal(label, scene[row["id"]])
        assert row["image"].size == row["label"].size and row["image"].mode == "RGB"


def _mmcv_seg_map(path: Path, backend: str) -> np.ndarray:
    """An annotation PNG as mmseg's LoadAnnotations reads it: ``mmcv.imfrombytes(bytes, flag='unchanged',
    backend=imdecode_backend).squeeze().astype(np.uint8)``; pillow (the default) keeps the decoded array as it is,
    cv2 decodes with IMREAD_UNCHANGED."""
    data = path.read_bytes()
    if backend == "cv2":
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        with Image.open(io.BytesIO(data)) as im:
            array = np.array(im)
    return array.squeeze().astype(np.uint8)


@pytest.mark.parametrize("background", [True, False])
def test_mmseg_snippet_and_folders_follow_its_dataset_rules(tmp_path, background):
    scene, exports = _formats(tmp_path, background, ["mmseg"])
    snippet = {}
    exec(compile((exports / "mmseg" / "dataset.py").read_text(), "dataset.py", "exec"), {"dict": dict}, snippet)
    ds = snippet["train_dataloader"]["dataset"]
    assert ds is snippet["train_dataset"] and ds["pipeline"][0] == {"type": "LoadImageFromFile"}
    assert ds["pipeline"][1] == {"type": "LoadAnnotations"}  # mmseg's defaults: imdecode_backend pillow
    assert ds["type"] == "BaseSegDataset" and ds["reduce_zero_label"] is False and ds["ignore_index"] == 255
    names = (["background"] if background else []) + CLASSES
    assert ds["metainfo"]["classes"] == tuple(names)
    assert ds["metainfo"]["palette"] == [voc_palette()[3 * k: 3 * k + 3] for k in range(len(names))]
    root = Path(ds["data_root"])
    assert root == (exports / "mmseg").resolve()
    for i, label in scene.items():  # mmseg: img_path/<name><img_suffix> pairs with seg_map_path/<name><seg_map_suffix>
        img = root / ds["data_prefix"]["img_path"] / f"{i}{ds['img_suffix']}"
        seg = root / ds["data_prefix"]["seg_map_path"] / f"{i}{ds['seg_map_suffix']}"
        for backend in ("pillow", "cv2"):  # either of mmcv's decoders reads the label indices
            np.testing.assert_array_equal(_mmcv_seg_map(seg, backend), label, err_msg=f"{i} {backend}")
        np.testing.assert_array_equal(cv2.imread(str(seg), cv2.IMREAD_GRAYSCALE), label)  # and a plain cv2.imread
        assert set(np.unique(label)) - {255} <= set(range(len(names)))  # every value a class of metainfo, or ignore
        assert Image.open(img).size == Image.open(seg).size
    assert len(list((root / "img_dir" / "train").iterdir())) == len(scene)


def _resample(segment: np.ndarray, n: int = 1000) -> np.ndarray:
    """Ultralytics' ``resample_segments`` (ultralytics/utils/ops.py): the polygon closed, then n points along it by
    linear interpolation, its own vertices kept."""
    s = np.concatenate((segment, segment[:1]), axis=0)
    x = np.linspace(0, len(s) - 1, n - len(s))
    xp = np.arange(len(s))
    x = np.insert(x, np.searchsorted(x, xp), xp)
    return np.concatenate([np.interp(x, xp, s[:, d]) for d in range(2)], dtype=np.float32).reshape(2, -1).T


def _ultralytics_masks(label_file: Path, num_classes: int, h: int, w: int) -> np.ndarray:
    """The class masks Ultralytics trains on from a segmentation label file, by its rules (verify_image_label in
    ultralytics/data/utils.py, then denormalize, resample_segments and polygon2mask): lines split on whitespace,
    segments when a line has more than 6 values, each checked as a box (5 columns, coordinates within [0, 1],
    class below the count, no duplicate row); the points scaled by the image size in float32, resampled, truncated
    to int32 and filled with cv2.fillPoly."""
    rows = [x.split() for x in label_file.read_text(encoding="utf-8").strip().splitlines() if len(x)]
    masks = np.zeros((num_classes, h, w), bool)
    if not rows:
        return masks
    assert any(len(r) > 6 for r in rows)  # read as segments, not as boxes
    classes = np.array([r[0] for r in rows], np.float32)
    segments = [np.array(r[1:], np.float32).reshape(-1, 2) for r in rows]
    boxes = np.array([[s[:, 0].min(), s[:, 1].min(), s[:, 0].max(), s[:, 1].max()] for s in segments])
    lb = np.concatenate([classes[:, None], (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    assert lb.shape[1] == 5 and lb[:, 1:].max() <= 1.01 and lb.min() >= -0.01 and lb[:, 0].max() < num_classes
    assert len(np.unique(lb, axis=0)) == len(lb)  # Ultralytics would drop a duplicate
    for k, s in zip(classes.astype(int), segments, strict=True):
        points = _resample(s * np.array([w, h], np.float32)).astype(np.int32)
        canvas = np.zeros((h, w), np.uint8)
        cv2.fillPoly(canvas, [points.reshape(-1, 1, 2)], 1)
        masks[k] |= canvas.astype(bool)
    return masks


@pytest.mark.parametrize("background", [True, False])
def test_yolo_polygons_read_by_ultralytics_rules_give_the_label_maps(tmp_path, background):
    """Each class's mask, as Ultralytics rasterises the polygons, is exactly the union of its components with their
    holes filled (a polygon has none); a component enclosing no area (one pixel) is dropped. Without a background
    class, the class that fills the rest of an image is one large polygon under the others."""
    scene, exports = _formats(tmp_path, background, ["yolo"])
    data = yaml.safe_load((exports / "yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "disc", 1: "ring", 2: "dot"} and Path(data["path"]) == (exports / "yolo").resolve()
    off = int(background)
    for i, label in scene.items():
        h, w = label.shape
        assert (Path(data["path"]) / data["train"] / f"{i}.jpg").exists()
        drawn = _ultralytics_masks(exports / "yolo" / "labels" / "train" / f"{i}.txt", len(data["names"]), h, w)
        for k in range(len(CLASSES)):
            want = np.zeros((h, w), bool)
            for component in _components(label, k + off):
                if component.sum() > 1:
                    want |= ndimage.binary_fill_holes(component)
            np.testing.assert_array_equal(drawn[k], want, err_msg=f"{i} class {k}")
    lines = (exports / "yolo" / "labels" / "train" / "a.txt").read_text().splitlines()
    # 2 discs and 1 ring; without a background class also "dot": the rest of the image, and the ring's hole
    assert sorted(line.split()[0] for line in lines) == ["0", "0", "1"] + ([] if background else ["2", "2"])


def test_cvat_segmentation_mask_follows_its_labelmap(tmp_path):
    scene, exports = _formats(tmp_path, True, ["cvat"])
    cvat = exports / "cvat"
    rows = [ln.split(":") for ln in (cvat / "labelmap.txt").read_text().splitlines() if not ln.startswith("#")]
    colours = {tuple(int(c) for c in rgb.split(",")): name for name, rgb, *_ in rows}
    assert [r[0] for r in rows] == ["background", *CLASSES, "ignore"] and len(colours) == len(rows)
    assert (cvat / "ImageSets" / "Segmentation" / "default.txt").read_text().splitlines() == list(scene)
    names = ["background", *CLASSES]
    for i, label in scene.items():
        rgb = np.asarray(Image.open(cvat / "SegmentationClass" / f"{i}.png").convert("RGB"))
        decoded = np.vectorize(lambda *c: colours[c], otypes=[object])(rgb[..., 0], rgb[..., 1], rgb[..., 2])
        expected = np.array([names[v] if v != 255 else "ignore" for v in label.ravel()], object).reshape(label.shape)
        assert (decoded == expected).all(), i
        objects = np.asarray(Image.open(cvat / "SegmentationObject" / f"{i}.png"))
        n = sum(len(_components(label, v)) for v in (1, 2, 3, 255))  # ignored pixels are objects too
        assert sorted(np.unique(objects).tolist()) == list(range(n + 1))
        assert Image.open(cvat / "JPEGImages" / f"{i}.jpg").size == (label.shape[1], label.shape[0])


def test_write_cvat_takes_any_subset_of_plain_tuples(tmp_path):
    image = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(image)
    label = np.zeros((6, 8), np.uint8)
    label[1:3, 1:3] = 2
    assert write_cvat(tmp_path / "pkg", [("x", image, label)], ["building", "grass", "sky"], background=False) == 1
    rows = (tmp_path / "pkg" / "labelmap.txt").read_text().splitlines()[1:]
    assert rows == ["background:0,0,0::", "building:128,0,0::", "grass:0,128,0::", "sky:128,128,0::",
                    "ignore:224,224,192::"]  # without a background class no class is black
    rgb = np.asarray(Image.open(tmp_path / "pkg" / "SegmentationClass" / "x.png"))
    assert tuple(rgb[0, 0]) == (128, 0, 0) and tuple(rgb[1, 1]) == (128, 128, 0)
    with pytest.raises(ValueError, match="label values \\[7\\] have no name"):
        write_cvat(tmp_path / "bad", [("x", image, np.full((6, 8), 7, np.uint8))], ["a", "b"], background=True)
