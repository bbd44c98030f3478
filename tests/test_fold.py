"""Folding BatchNorm into convolutions (pipeline/models/fold.py) gives the unfolded model's outputs, on
torchvision and timm networks, and ``fold=False`` (maps.fold_batchnorm) keeps the BatchNorms."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from pipeline.maps import get_map_method
from pipeline.models import build_classifier
from pipeline.models.fold import fold_batchnorm, inference_copy


def _randomise_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so that a wrong fold shows
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_batchnorm_keeps_the_scores_of_a_resnet_and_an_efficientnet():
    x = torch.randn(2, 3, 64, 80)
    resnet = _randomise_bn(torchvision.models.resnet18(num_classes=5))
    lite0, _ = build_classifier("cam", "tf_efficientnet_lite0", "none", 5)
    for model in (resnet, _randomise_bn(lite0)):
        folded = fold_batchnorm(model)
        assert _count_bn(model) >= 20 and _count_bn(folded) == 0  # every BatchNorm folded
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
        assert _count_bn(model) >= 20  # the model itself is untouched


def test_inference_copy_falls_back_when_folding_would_change_the_scores():
    class BatchNormFirst(nn.Module):  # registered conv, bn, but the BatchNorm runs before the convolution
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x)).mean((2, 3))

    model = _randomise_bn(BatchNormFirst())
    x = torch.randn(1, 3, 16, 16)
    assert _count_bn(fold_batchnorm(model)) == 0  # the module-tree rule alone would fold it ...
    copy = inference_copy(model, x)
    assert _count_bn(copy) == 1  # ... the probe catches it and the copy keeps its BatchNorm
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))


def test_inference_copy_is_reused_until_the_model_changes():
    model = _randomise_bn(torchvision.models.resnet18(num_classes=5).eval())
    x = torch.randn(1, 3, 32, 32)
    first = inference_copy(model, x)
    assert inference_copy(model, torch.randn(1, 3, 48, 48)) is first  # any probe: the same model, the same copy
    with torch.no_grad():
        model.fc.weight.mul_(2)  # an in-place update
    second = inference_copy(model, x)
    assert second is not first
    with torch.no_grad():
        torch.testing.assert_close(second(x), model(x), atol=1e-5, rtol=1e-4)
    model.load_state_dict(torchvision.models.resnet18(num_classes=5).state_dict())
    third = inference_copy(model, x)
    assert third is not second
    with torch.no_grad():
        torch.testing.assert_close(third(x), model(x), atol=1e-5, rtol=1e-4)
    model.train()  # a copy for training-mode forwards keeps its BatchNorms
    assert inference_copy(model, x) is not third and _count_bn(inference_copy(model, x)) > 0


def test_fold_off_keeps_the_batchnorms_and_a_copy_is_its_own_inference_copy():
    """maps.fold_batchnorm false: the unfolded channels_last copy; both copies give the model's class maps and
    scores (folded against unfolded), and a map method that asks for the copy's copy (Score-CAM) gets it back,
    so the choice holds inside it too."""
    torch.manual_seed(0)
    model, _ = build_classifier("cam", "tf_efficientnet_lite0", "none", 3)
    model = _randomise_bn(model).requires_grad_(False)
    x = torch.randn(1, 3, 64, 64)
    folded, unfolded = inference_copy(model, x), inference_copy(model, x, fold=False)
    assert _count_bn(folded) == 0 and _count_bn(unfolded) == _count_bn(model) > 0
    assert inference_copy(model, x, fold=False) is unfolded  # the last copy is kept while the model is unchanged
    assert inference_copy(unfolded, x) is unfolded and inference_copy(folded, x, fold=False) is folded
    classes = torch.tensor([[True, False, True]])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), unfolded(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(unfolded(x), model(x), rtol=1e-5, atol=1e-5)
        cams = [get_map_method("cam")(m, x, classes) for m in (model, folded, unfolded)]
    torch.testing.assert_close(cams[1], cams[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(cams[2], cams[0], rtol=1e-4, atol=1e-5)
