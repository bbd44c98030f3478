from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import MapsConfig
from pipeline.data import Sample, read_image
from pipeline.maps import get_map_method
from pipeline.maps.generate import MapJob, image_maps, method_functions
from pipeline.maps.inference import multiscale_maps, to_tensor
from pipeline.models import build_classifier
from tests.conftest import write_rgb


def _net():
    torch.manual_seed(0)
    net, _ = build_classifier("cam", "smallcnn", "none", 4)
    return net.eval()


def test_cam_equals_weighted_sum_of_features_by_hand():
    net = _net()
    x = torch.randn(2, 3, 48, 40)
    classes = torch.tensor([[True, False, True, False], [False, True, True, True]])
    out = get_map_method("cam")(net, x, classes)
    feats = net.features(x).detach()
    w = net.classifier.weight.detach()
    for b in range(2):
        for c in range(4):
            by_hand = sum(w[c, k] * feats[b, k] for k in range(feats.shape[1]))  # sum_k w_kc f_k
            expected = F.interpolate(F.relu(by_hand)[None, None], size=(48, 40), mode="bilinear",
                                     align_corners=False)[0, 0]
            if classes[b, c]:
                torch.testing.assert_close(out[b, c], expected, rtol=1e-4, atol=1e-5)
            else:
                assert (out[b, c] == 0).all()


def test_gap_of_cam_is_the_class_score():
    net = _net()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        raw = net.class_maps(net.features(x))
        torch.testing.assert_close(raw.mean(dim=(2, 3)), net(x), rtol=1e-4, atol=1e-5)


def test_multiscale_flip_maps_normalised_and_symmetric():
    net = _net()
    x = torch.randn(1, 3, 40, 56)
    x = torch.cat([x[..., :28], x[..., :28].flip(-1)], dim=-1)  # a mirror-symmetric image
    classes = torch.tensor([[True, True, False, False]])
    maps = multiscale_maps(get_map_method("cam"), net, x, classes, [1.0, 0.5], flip=True)
    assert maps.shape == (4, 40, 56)
    assert torch.allclose(maps[:2].flatten(1).amax(1), torch.ones(2), atol=1e-3)
    assert (maps[2:] == 0).all() and maps.min() >= 0
    torch.testing.assert_close(maps, maps.flip(-1), rtol=1e-4, atol=1e-4)  # flip-averaged


def test_make_maps_runs_the_methods_on_the_folded_copy_with_the_same_maps(tmp_path):
    """image_maps (make_maps' per-image path) uses the classifier's BatchNorm-folded copy: the maps are those
    of the plain classifier within float16 rounding."""
    net = _net()
    with torch.no_grad():  # BatchNorm statistics that folding must carry over
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    write_rgb(tmp_path / "a.png", np.random.default_rng(0).integers(0, 255, (40, 48, 3)))
    job = MapJob(Sample("a", tmp_path / "a.png", (1, 3)), ("cam", "gradcam"))
    ckpt = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    x = to_tensor(read_image(tmp_path / "a.png"), ckpt["mean"], ckpt["std"], torch.device("cpu"))
    present = torch.tensor([[False, True, False, True]])
    for fold in (True, False):  # maps.fold_batchnorm
        cfg = MapsConfig(methods=["cam", "gradcam"], scales=[1.0, 1.5], flip=True, fold_batchnorm=fold)
        got = dict(image_maps(net, ckpt, method_functions(cfg), job, cfg, 4, torch.device("cpu")))
        for m in ("cam", "gradcam"):
            want = multiscale_maps(get_map_method(m), net, x, present, [1.0, 1.5], True)[[1, 3]].numpy()
            assert got[m].dtype == np.float16 and np.abs(got[m].astype(np.float32) - want).max() < 2e-3
