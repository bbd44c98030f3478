"""The downstream segmenter: ignore handling of the loss, the model, prediction and the predict command."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import on_tiny
from PIL import Image

from pipeline.config import CRFConfig
from pipeline.errors import ConfigError, UserError
from pipeline.models.backbones import create_backbone
from pipeline.models.segmenter import DeepLabV3, build_segmenter, load_segmenter, segmenter_state
from pipeline.runfolder import save_torch, voc_palette
from pipeline.segmenter.predict import Predictor, checked_scales, overlay
from pipeline.segmenter.train import segmentation_loss
from stages.cli import main
from tests.conftest import write_rgb


def test_ignored_pixels_add_no_loss_and_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, :2] = 255
    target[1, :, 3:] = 255
    valid = target != 255

    loss = segmentation_loss(logits, target)
    by_hand = -F.log_softmax(logits, 1).gather(1, target.clamp(max=3)[:, None])[:, 0][valid].mean()
    assert torch.allclose(loss, by_hand, atol=1e-6)

    loss.backward()
    grad = logits.grad.permute(0, 2, 3, 1)  # [B,H,W,L]
    assert grad[~valid].abs().max() == 0  # no gradient at an ignored pixel, for any label
    assert grad[valid].abs().min() > 0

    other = logits.detach().clone()
    other.permute(0, 2, 3, 1)[~valid] = torch.randn(int((~valid).sum()), 4) * 100  # change ignored logits only
    assert torch.allclose(segmentation_loss(other, target), loss.detach(), atol=1e-6)


def test_all_ignored_batch_gives_zero_loss_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(loss) and logits.grad.abs().max() == 0


def test_deeplabv3_outputs_logits_at_input_size():
    net, _ = build_segmenter("smallcnn", "none", num_labels=5, channels=16, atrous_rates=[2, 4, 6])
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 37, 50))
    assert out.shape == (2, 5, 37, 50)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    net, bb = build_segmenter("smallcnn", "none", num_labels=4, channels=16, atrous_rates=[2, 4, 6])
    path = tmp_path / "segmenter.pt"
    save_torch(path, segmenter_state(net, backbone=bb, backbone_name="smallcnn", classes=["cat", "dog", "sofa"],
                                     background=True, channels=16, atrous_rates=[2, 4, 6], input_size=48,
                                     masks="pseudo"))
    return path


def test_predictor_probabilities_and_mirror_average(checkpoint):
    net, ckpt = load_segmenter(checkpoint)
    image = np.random.default_rng(0).integers(0, 255, (30, 41, 3), dtype=np.uint8)
    probs = Predictor(net, ckpt, torch.device("cpu"), flip=True).probs(image)
    assert probs.shape == (4, 30, 41)
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    plain = Predictor(net, ckpt, torch.device("cpu"), flip=False)
    mirrored = plain.probs(image[:, ::-1].copy())[:, :, ::-1]
    assert np.allclose(probs, (plain.probs(image) + mirrored) / 2, atol=1e-5)


def test_multi_scale_testing_averages_the_scales(checkpoint):
    net, ckpt = load_segmenter(checkpoint)
    image = np.random.default_rng(1).integers(0, 255, (30, 41, 3), dtype=np.uint8)
    at = {s: Predictor(net, ckpt, torch.device("cpu"), scales=(s,)).probs(image) for s in (0.5, 1.0, 1.5)}
    assert all(p.shape == (4, 30, 41) and np.allclose(p.sum(0), 1, atol=1e-5) for p in at.values())
    assert np.allclose(at[1.0], Predictor(net, ckpt, torch.device("cpu")).probs(image), atol=1e-6)  # the default
    seen = []
    predictor = Predictor(net, ckpt, torch.device("cpu"), scales=(0.5, 1.0, 1.5))
    handle = predictor.net.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    multi = predictor.probs(image)
    handle.remove()
    assert seen == [(2, 3, 18, 24), (2, 3, 35, 48), (2, 3, 52, 72)]  # longest side 48 (input_size) x scale, + mirror
    assert np.allclose(multi, (at[0.5] + at[1.0] + at[1.5]) / 3, atol=1e-5)
    for bad in ([], [1.0, 0.0]):
        with pytest.raises(ConfigError, match="config key 'segmenter.test_scales'"):
            checked_scales(bad)


def test_a_batch_of_images_gives_each_its_own_probabilities(checkpoint):
    """Images of two sizes in one ``probs_batch``: each as ``probs`` gives it alone (same-size ones share a
    forward), with several scales and the mirror image."""
    net, ckpt = load_segmenter(checkpoint)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(30, 41, 3), (20, 48, 3), (30, 41, 3)]]
    predictor = Predictor(net, ckpt, torch.device("cpu"), scales=(0.5, 1.0))
    seen = []
    handle = predictor.net.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    batch = predictor.probs_batch(images)
    handle.remove()
    assert seen == [(4, 3, 18, 24), (4, 3, 35, 48), (2, 3, 10, 24), (2, 3, 20, 48)]  # by size, + mirrors
    for image, probs in zip(images, batch, strict=True):
        assert probs.shape == (4, *image.shape[:2])
        assert np.abs(probs - predictor.probs(image)).max() < 1e-5


def test_crf_post_processing_smooths_a_noisy_prediction(checkpoint):
    net, ckpt = load_segmenter(checkpoint)
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = 255  # two flat halves
    rng = np.random.default_rng(0)
    probs = np.full((4, 40, 40), 0.1, np.float32)
    probs[1, :, :20] = probs[2, :, 20:] = 0.7
    noise = rng.random((40, 40)) < 0.15  # 15% of pixels flipped to a wrong, confident label
    probs[:, noise] = 0.1
    probs[3, noise] = 0.7
    predictor = Predictor(net, ckpt, torch.device("cpu"), crf=CRFConfig())
    truth = np.where(np.arange(40) < 20, 1, 2)[None].repeat(40, 0)
    raw = predictor.labels(image, probs, crf=False)
    smooth = predictor.labels(image, probs, crf=True)
    assert (raw == truth).mean() < 0.9
    assert (smooth == truth).mean() > 0.99


def test_predict_command_on_two_images(tmp_path, checkpoint, capsys):
    images = tmp_path / "photos"
    rng = np.random.default_rng(1)
    write_rgb(images / "first.jpg", rng.integers(0, 255, (30, 44, 3)))
    write_rgb(images / "second.png", rng.integers(0, 255, (52, 36, 3)))
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["predict", "--images", str(images), "--out", str(out), "--checkpoint", str(checkpoint)]) == 0

    net, ckpt = load_segmenter(checkpoint)
    predictor = Predictor(net, ckpt, torch.device("cpu"), flip=True)  # the default config's segmenter.flip_test
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["first.png", "second.png"]
    for name, (h, w) in (("first", (30, 44)), ("second", (52, 36))):
        with Image.open(out / "masks" / f"{name}.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            assert im.getpalette()[:12] == voc_palette()[:12]
            mask = np.asarray(im)
        image = np.asarray(Image.open(images / f"{name}{'.jpg' if name == 'first' else '.png'}").convert("RGB"))
        assert np.array_equal(mask, predictor.labels(image))
        with Image.open(out / "overlays" / f"{name}.jpg") as im:
            assert im.format == "JPEG" and im.size == (w, h)
    legend = json.loads((out / "legend.json").read_text())
    assert [legend[k]["name"] for k in sorted(legend, key=int)] == ["background", "cat", "dog", "sofa"]
    assert legend["1"]["rgb"] == voc_palette()[3:6]


def test_predict_command_errors_in_one_line(tmp_path, checkpoint, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--images", str(empty), "--out", str(tmp_path / "o"), "--checkpoint",
                 str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {empty}: no images in it")
    missing = tmp_path / "nothing.pt"
    assert main(["predict", "--images", str(empty), "--out", str(tmp_path / "o"), "--checkpoint",
                 str(missing)]) == 2
    assert f"{missing}: segmenter checkpoint not found" in capsys.readouterr().err


def test_overlay_blends_label_colours_and_keeps_ignored_pixels():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [255, 2]], np.uint8)
    out = overlay(image, labels, alpha=0.5)
    pal = np.asarray(voc_palette()).reshape(-1, 3)
    assert np.array_equal(out[0, 1], np.round((100 + pal[1]) / 2).astype(np.uint8))
    assert np.array_equal(out[1, 0], image[1, 0])


def tiny_config(tmp_path, root, **segmenter) -> str:
    cfg = {"run_dir": str(tmp_path / "run"), "device": "cpu", "data": {"kind": "voc", "root": str(root)},
           "classifier": {"backbone": "smallcnn", "input_size": 32, "epochs": 1, "batch_size": 2},
           "maps": {"flip": False}, "refine": {"workers": "1", "refiners": ["threshold"]},
           "segmenter": {"backbone": "smallcnn", "pretrained": "none", "channels": 8, "atrous_rates": [1, 2, 3],
                         "input_size": 32, "crop_size": 32, "epochs": 2, "batch_size": 2, **segmenter}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    return str(path)


def test_segmenter_on_gt_masks_has_no_twin(tiny_voc, tmp_path):
    cfg = tiny_config(tmp_path, tiny_voc(True), masks="gt")
    assert main(["all", "--config", cfg]) == 0
    run = tmp_path / "run"
    assert (run / "segmenter.pt").exists() and not (run / "segmenter_gt.pt").exists()
    assert torch.load(run / "segmenter.pt", weights_only=False)["masks"] == "gt"
    seg = json.loads((run / "metrics.json").read_text())["segmenter"]
    assert seg["split"] == "val" and list(seg["models"]) == ["segmenter"]
    assert seg["models"]["segmenter"]["masks"] == "gt"
    assert "upper_bound_miou" not in seg and 0 <= seg["miou"] <= 1
    assert len(json.loads((run / "segmenter_log.json").read_text())) == 2


def test_segmenter_needs_the_export_first(tiny_voc, tmp_path, capsys):
    cfg = tiny_config(tmp_path, tiny_voc(True))
    assert main(["train_segmenter", "--config", cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'run' / 'pseudo_masks'}: no exported pseudo-masks (run the export stage "
                   "first, or set segmenter.masks: gt)"]


def test_disabled_segmenter_is_skipped_and_not_scored(tiny_voc, tmp_path):
    cfg = tiny_config(tmp_path, tiny_voc(True), enabled=False)
    assert main(["all", "--config", cfg]) == 0
    run = tmp_path / "run"
    assert not (run / "segmenter.pt").exists() and not (run / "train_segmenter.done.json").exists()
    assert "segmenter" not in json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("name, stages, first_trained", [
    ("smallcnn", 1, "4.0.weight"),  # taps "3", "5": stage 1 ends with module 3
    ("resnet18", 1, "net.layer2.0.conv1.weight"),  # stem + layer1 (detectron2's freeze_at=2)
    ("tf_efficientnet_lite0", 2, "net.blocks.3.0.conv_pw.weight"),  # stem + blocks 0-2 (stride 8)
    ("tf_efficientnet_lite2", 2, "net.blocks.3.0.conv_pw.weight"),  # the same stages, wider
])
def test_frozen_stages_keep_their_weights_and_statistics(name, stages, first_trained):
    torch.manual_seed(0)
    net = DeepLabV3(create_backbone(name, "none"), num_labels=3, channels=8, atrous_rates=[2, 4, 6],
                    frozen_stages=stages)  # (build_segmenter refuses to freeze random weights: below)
    names = [n for n, _ in net.named_parameters()]
    trained = [n for n, p in net.named_parameters() if p.requires_grad]
    # the parameters before the first trained one are frozen, none after it (registration order = forward order)
    assert trained == names[names.index("backbone." + first_trained):]
    frozen = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)
              and not m.weight.requires_grad]
    assert frozen and all(not m.training for m in net.train().modules() if m in frozen)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 3, 64, 64)
    F.cross_entropy(net(x), torch.randint(0, 3, (2, 64, 64))).backward()
    opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_keys = {k for k in before if k.rpartition(".")[0] in
                   {n.rpartition(".")[0] for n in names[:names.index("backbone." + first_trained)]}}
    assert frozen_keys and not changed & frozen_keys  # weights and running statistics alike
    assert "backbone." + first_trained in changed

    # a frozen BatchNorm swapped for another layer (as SyncBatchNorm replaces it under DDP on CUDA) stays frozen
    name = next(n for n, m in net.named_modules() if m in frozen)
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent), child, copy.deepcopy(net.get_submodule(name)).train())
    assert not net.train().get_submodule(name).training


def test_frozen_stages_out_of_range_or_random_name_the_key(tmp_path):
    weights = tmp_path / "smallcnn.pt"
    torch.save(create_backbone("smallcnn").body.state_dict(), weights)
    with pytest.raises(ConfigError, match="segmenter.frozen_stages.*expected 0 to 2"):
        build_segmenter("smallcnn", str(weights), num_labels=3, channels=8, atrous_rates=[2, 4, 6], frozen_stages=3)
    with pytest.raises(ConfigError, match="segmenter.frozen_stages.*randomly initialised"):
        build_segmenter("smallcnn", "none", num_labels=3, channels=8, atrous_rates=[2, 4, 6], frozen_stages=1)


def test_the_head_reads_the_last_stage_without_the_classifier_widening(tmp_path):
    torch.manual_seed(0)
    net, bb = build_segmenter("tf_efficientnet_lite0", "none", num_labels=3, channels=8, atrous_rates=[6, 12, 18])
    assert bb.channels == 320
    assert not any(n.startswith(("backbone.net.conv_head", "backbone.net.bn2")) for n, _ in net.named_parameters())
    full = create_backbone("tf_efficientnet_lite0", "none").body  # with its widening: the classifier's features
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the body ends at the last block: what the full body feeds its 1x1 widening conv
        fed = {}
        full.net.conv_head.register_forward_pre_hook(lambda m, i: fed.update(x=i[0]))
        full.net.load_state_dict(net.backbone.net.state_dict(), strict=False)
        full.eval()(x)
        assert torch.allclose(net.eval().backbone(x), fed["x"], atol=1e-6)

    path = tmp_path / "segmenter.pt"  # the checkpoint rebuilds the same network
    state = segmenter_state(net, backbone=bb, backbone_name="tf_efficientnet_lite0", classes=["a", "b"],
                            background=True, channels=8, atrous_rates=[6, 12, 18], input_size=64, masks="pseudo")
    save_torch(path, state)
    loaded, ckpt = load_segmenter(path)
    assert ckpt["features"] == "last_stage"
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)
    for features in ("classifier", None):  # the removed segmenter.features: classifier, or from before the key
        old = {k: v for k, v in state.items() if k != "features"} | ({"features": features} if features else {})
        save_torch(tmp_path / "old.pt", old)
        with pytest.raises(UserError, match=r"reads the classifier's features.*rerun train_segmenter with --force$"):
            load_segmenter(tmp_path / "old.pt")
