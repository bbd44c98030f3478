"""ReCAM (Chen et al. 2022): the class-specific features, the two losses, the map, training, checkpoint, config."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.maps import get_map_method
from pipeline.models import ReCAMNet, build_classifier, classifier_state, load_classifier
from pipeline.models.backbones import Backbone
from pipeline.train import training_losses


def _hand_net(w: torch.Tensor, w_re: torch.Tensor, weight: float = 1.0) -> ReCAMNet:
    """Features = the input ([B,K,h,w]); the BCE head W and the softmax head W' given [C,K]."""
    net = ReCAMNet(Backbone(nn.Identity(), w.shape[1], 1, (0.0,) * 3, (1.0,) * 3), w.shape[0], weight)
    with torch.no_grad():
        net.classifier.weight.copy_(w)
        net.classifier_re.weight.copy_(w_re)
    return net


def _pooled_by_hand(net: ReCAMNet, feats: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """f^c_k = mean over positions of M_c * f_k, M_c = ReLU(CAM_c) / its max, one channel at a time."""
    cam = sum(net.classifier.weight[c, k] * feats[b, k] for k in range(feats.shape[1])).clamp_min(0)
    m = cam / cam.max()
    return torch.stack([(m * feats[b, k]).mean() for k in range(feats.shape[1])])


def test_class_features_are_the_features_pooled_under_the_normalised_cam():
    torch.manual_seed(0)
    net = _hand_net(torch.randn(3, 4), torch.randn(3, 4))
    feats = torch.randn(2, 4, 5, 6)
    b, c = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1])
    got = net.class_features(feats, b, c)
    for p in range(3):
        torch.testing.assert_close(got[p], _pooled_by_hand(net, feats, int(b[p]), int(c[p])), rtol=1e-5, atol=1e-6)


def test_losses_are_the_bce_and_lambda_times_the_softmax_ce_of_the_labelled_pairs():
    torch.manual_seed(1)
    net = _hand_net(torch.randn(3, 4), torch.randn(3, 4), weight=0.5)
    x = torch.randn(2, 4, 5, 6)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    losses = net.training_losses(x, y)
    assert set(losses) == {"bce", "sce"}
    scores = torch.stack([net.classifier.weight @ x[i].mean(dim=(1, 2)) for i in range(2)])
    torch.testing.assert_close(losses["bce"], F.binary_cross_entropy_with_logits(scores, y))
    pairs = [(0, 0), (0, 2), (1, 1)]  # every labelled class of every image, none of the others
    ce = [-torch.log_softmax(net.classifier_re.weight @ _pooled_by_hand(net, x, b, c), 0)[c] for b, c in pairs]
    torch.testing.assert_close(losses["sce"], 0.5 * torch.stack(ce).mean(), rtol=1e-5, atol=1e-6)


def test_a_batch_without_labelled_classes_has_a_zero_softmax_loss():
    net = _hand_net(torch.ones(2, 3), torch.ones(2, 3))
    losses = net.training_losses(torch.randn(2, 3, 4, 4), torch.zeros(2, 2))
    assert losses["sce"].item() == 0.0 and torch.isfinite(losses["bce"])
    sum(losses.values()).backward()  # both heads stay in the graph (DDP needs every parameter used)
    assert net.classifier_re.weight.grad is not None


def test_recam_map_is_the_second_heads_map_and_cam_the_firsts():
    w, w_re = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, -1.0], [2.0, 1.0]])
    net = _hand_net(w, w_re)
    feats = torch.tensor([[[1.0, 0.5], [0.7, 0.2]], [[2.0, 0.4], [0.1, 0.8]]])[None]  # [1,2,2,2]
    classes = torch.tensor([[True, False]])
    recam = get_map_method("recam")(net, feats, classes)
    torch.testing.assert_close(recam[0, 0], (0.5 * feats[0, 0] - feats[0, 1]).clamp_min(0))
    assert (recam[0, 1] == 0).all()  # not requested
    cam = get_map_method("cam")(net, feats, classes)
    torch.testing.assert_close(cam[0, 0], feats[0, 0])  # cam of a ReCAM net: the BCE head's map
    same = _hand_net(w, w)
    recam, cam = (get_map_method(m)(same, feats, classes) for m in ("recam", "cam"))
    torch.testing.assert_close(recam, cam)


def test_the_softmax_loss_joins_in_the_last_epochs_only():
    torch.manual_seed(2)
    net = _hand_net(torch.randn(2, 3), torch.randn(2, 3))
    net.epochs = 2
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    on = []
    for epoch in range(5):
        net.set_epoch(epoch, 5)
        on.append(net.training_losses(x, y)["sce"].item() > 0)
    assert on == [False, False, False, True, True]
    net.epochs = None  # every epoch
    net.set_epoch(0, 5)
    assert net.training_losses(x, y)["sce"].item() > 0


def test_one_training_step_lowers_both_losses():
    torch.manual_seed(0)
    net, _ = build_classifier("recam", "smallcnn", "none", 3, {"weight": 1.0})
    net.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]]).float()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    before = training_losses(net, x, y)
    opt.zero_grad()
    sum(before.values()).backward()
    opt.step()
    after = training_losses(net, x, y)
    assert after["bce"] < before["bce"] - 0.01 and after["sce"] < before["sce"] - 0.01


def test_weight_travels_in_the_checkpoint_and_config(tmp_path):
    cfg = config_from_dict({"classifier": {"model": "recam", "recam": {"weight": 0.25}}})
    assert cfg.classifier.model == "recam" and cfg.classifier.recam.weight == 0.25
    net, bb = build_classifier("recam", "smallcnn", "none", 2, {"weight": 0.25})
    torch.save(classifier_state(net, model="recam", backbone=bb, backbone_name="smallcnn", classes=["a", "b"],
                                background=True, input_size=32), tmp_path / "classifier.pt")
    loaded, _ = load_classifier(tmp_path / "classifier.pt")
    assert isinstance(loaded, ReCAMNet) and loaded.weight.item() == pytest.approx(0.25)
    torch.testing.assert_close(loaded.classifier_re.weight, net.classifier_re.weight)


def test_recam_maps_need_a_recam_classifier():
    net, _ = build_classifier("cam", "smallcnn", "none", 2)
    with pytest.raises(ConfigError, match="classifier.model: recam"):
        get_map_method("recam")(net.eval(), torch.randn(1, 3, 16, 16), torch.tensor([[True, False]]))


def test_the_stage_trains_a_recam_net_with_the_softmax_loss_in_its_last_epochs(tiny_voc, tmp_path):
    """Through train_classifier and make_maps: the training loop switches the loss on, recam maps are written."""
    root = tiny_voc(True)
    cfg = {"run_dir": str(tmp_path / "run"), "device": "cpu", "data": {"kind": "voc", "root": str(root)},
           "classifier": {"model": "recam", "backbone": "smallcnn", "input_size": 32, "epochs": 3, "batch_size": 2,
                          "recam": {"weight": 0.5, "epochs": 1}},
           "maps": {"flip": False, "scales": [1.0], "methods": ["cam", "recam"]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train_classifier", "--config", str(path)]) == 0
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [e["loss_sce"] > 0 for e in log] == [False, False, True]
    loaded, ckpt = load_classifier(tmp_path / "run" / "classifier.pt")
    assert ckpt["model"] == "recam" and loaded.weight.item() == 0.5
    assert main(["make_maps", "--config", str(path)]) == 0
    for method in ("cam", "recam"):
        assert len(list((tmp_path / "run" / "maps" / method).glob("*.npz"))) == 3  # the train split
