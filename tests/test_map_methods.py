"""Map methods against their definitions and against the peer libraries (captum, pytorch-grad-cam)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maps import get_map_method
from pipeline.maps.inference import normalise_max
from pipeline.models import build_classifier


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model, _ = build_classifier("cam", "smallcnn", "none", 5)
    for m in model.modules():  # non-trivial BN statistics so eval mode is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 40, 48)
    classes = torch.tensor([[True, False, True, False, True], [False, True, False, False, True]])
    return x, classes


def _per_class(captum_attr, x, classes, **kw):
    """Call a captum method once per (image, class) pair -> max |.| over channels, [B,C,H,W]."""
    out = torch.zeros(classes.shape + x.shape[-2:])
    for b, c in classes.nonzero().tolist():
        out[b, c] = captum_attr(x[b:b + 1], target=c, **kw)[0].abs().amax(0)
    return out


def test_cam_equals_gradcam_on_gap_linear_head_up_to_normalisation(net, batch):
    x, classes = batch
    cam = get_map_method("cam")(net, x, classes)
    grad = get_map_method("gradcam")(net, x, classes)
    torch.testing.assert_close(normalise_max(cam), normalise_max(grad), rtol=1e-4, atol=1e-5)
    assert (grad[~classes] == 0).all()


def test_gradcam_matches_pytorch_grad_cam(net, batch):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x, classes = batch
    ours = get_map_method("gradcam")(net, x, classes, layer="backbone.6")
    compared = 0
    peer_net = copy.deepcopy(net).requires_grad_(True)  # the peer needs a graph through the parameters
    with GradCAM(model=peer_net, target_layers=[peer_net.backbone[6]]) as peer:
        for b, c in classes.nonzero().tolist():
            theirs = torch.from_numpy(peer(x[b:b + 1], targets=[ClassifierOutputTarget(c)])[0])
            # the peer min-max normalises, then resizes with cv2 (bilinear, half-pixel centres as ours)
            mine = ours[b, c] - ours[b, c].min()
            if mine.max() == 0:  # ReLU left nothing (random weights): the peer's map is empty too
                assert theirs.abs().max() < 1e-6
                continue
            torch.testing.assert_close(mine / mine.max(), theirs, atol=1e-3, rtol=0)
            compared += 1
    assert compared >= 2


def test_saliency_matches_captum(net, batch):
    from captum.attr import Saliency

    x, classes = batch
    ours = get_map_method("saliency")(net, x, classes)
    torch.testing.assert_close(ours, _per_class(Saliency(net).attribute, x, classes, abs=True), atol=1e-5, rtol=1e-5)


def test_integrated_gradients_matches_captum(net, batch):
    from captum.attr import IntegratedGradients

    x, classes = batch
    ours = get_map_method("ig")(net, x, classes, steps=12, chunk=7)  # chunks that cut across steps
    theirs = _per_class(IntegratedGradients(net).attribute, x, classes, n_steps=12, method="gausslegendre",
                        baselines=0.0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_guided_backprop_matches_captum(net, batch):
    from captum.attr import GuidedBackprop

    x, classes = batch
    ours = get_map_method("guided")(net, x, classes)
    theirs = _per_class(GuidedBackprop(net).attribute, x, classes)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert all(m.inplace and not m._forward_hooks for m in relus)  # hooks undone


@pytest.mark.parametrize(("mode", "nt_type"), [("mean", "smoothgrad"), ("square", "smoothgrad_sq")])
def test_smoothgrad_matches_captum_noise_tunnel(net, batch, mode, nt_type):
    from captum.attr import NoiseTunnel, Saliency

    x, classes = batch
    x, classes = x[:1], classes[:1]  # one image: captum takes one sigma per input tensor
    sigma = 0.15
    ours = get_map_method("smoothgrad")(net, x, classes, n=6, sigma=sigma, mode=mode, seed=7, chunk=4)
    std = float((x.max() - x.min()) * sigma)
    theirs = torch.zeros_like(ours)
    for c in classes[0].nonzero().flatten().tolist():
        torch.manual_seed(7)  # the same noise for every class, as ours shares it
        attr = NoiseTunnel(Saliency(net)).attribute(x, nt_type=nt_type, nt_samples=6, stdevs=std, target=c,
                                                    abs=False)
        theirs[0, c] = attr[0].abs().amax(0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_smoothgrad_options(net, batch):
    x, classes = batch
    base = get_map_method("smoothgrad")(net, x, classes, n=4, seed=1)
    capped = get_map_method("smoothgrad")(net, x, classes, n=4, seed=1, cap_percentile=90)
    for b, c in classes.nonzero().tolist():
        q = np.quantile(base[b, c].numpy(), 0.9)
        np.testing.assert_allclose(capped[b, c].numpy(), np.minimum(base[b, c].numpy(), q), rtol=1e-5, atol=1e-6)
    wrapped = get_map_method("smoothgrad")(net, x, classes, base="guided", n=2, seed=1, sigma=0.0)
    torch.testing.assert_close(wrapped, get_map_method("guided")(net, x, classes), atol=1e-5, rtol=1e-5)
    ig0 = get_map_method("smoothgrad")(net, x, classes, base="ig", n=2, seed=1, sigma=0.0, mode="mean", steps=4)
    torch.testing.assert_close(ig0, get_map_method("ig")(net, x, classes, steps=4), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["saliency", "ig", "guided", "smoothgrad"])
def test_gradient_methods_run_in_fp32_under_autocast(net, batch, name):
    x, classes = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = get_map_method(name)(net, x, classes)
    torch.testing.assert_close(amp, get_map_method(name)(net, x, classes))


def test_gradcam_restores_the_grad_mode(net, batch):
    x, classes = batch
    with torch.no_grad():
        get_map_method("gradcam")(net, x, classes)
        assert not torch.is_grad_enabled()
    get_map_method("gradcam")(net, x, classes)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("name", ["cam", "gradcam", "saliency", "ig", "guided", "smoothgrad"])
def test_interface_shape_and_zero_for_other_classes(net, batch, name):
    x, classes = batch
    out = get_map_method(name)(net, x, classes)
    assert out.shape == (2, 5, 40, 48) and out.dtype == torch.float32
    assert (out >= 0).all() and (out[~classes] == 0).all() and out[classes].sum() > 0
    assert F.relu(out).equal(out)
