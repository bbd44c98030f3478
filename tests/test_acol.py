"""ACoL (Zhang et al. 2018): erasing, the fused map, B's gradient, training, checkpoint and config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.maps import get_map_method
from pipeline.models import ACoLNet, Classifier, build_classifier, classifier_state, load_classifier
from pipeline.models.acol_net import predicted_classes
from pipeline.models.backbones import Backbone
from pipeline.models.classifier import is_multilabel
from pipeline.train import training_losses

# two feature channels on a 2x2 map, fed straight to the heads by an identity backbone
F0 = [[1.0, 0.5], [0.7, 0.2]]
F1 = [[2.0, 0.4], [0.1, 0.8]]


def _hand_net(w_a: list[list[float]], w_b: list[list[float]], delta: float = 0.6) -> ACoLNet:
    """Features = the input; A_c = sum_k w_a[c][k] x_k, B likewise with w_b."""
    net = ACoLNet(Backbone(nn.Identity(), 2, 1, (0.0,) * 3, (1.0,) * 3), len(w_a), delta)
    with torch.no_grad():
        net.classifier.weight.copy_(torch.tensor(w_a)[:, :, None, None])
        net.classifier_b.weight.copy_(torch.tensor(w_b)[:, :, None, None])
    return net


def _features() -> torch.Tensor:
    return torch.tensor([F0, F1])[None]  # [1,2,2,2]


def test_erasing_zeroes_exactly_the_positions_where_a_reaches_delta():
    net = _hand_net([[1, 0], [0, 1]], [[0, 1], [1, 0]])  # A_0 = f0, A_1 = f1; B_0 = f1, B_1 = f0
    feats = _features()
    maps_a, maps_b = net.branch_maps(feats, torch.tensor([[True, False]]))
    # A_0 / max = f0 (max 1): >= 0.6 at (0,0) 1.0 and (1,0) 0.7; class 1 is not labelled: nothing erased
    expected = torch.tensor([[[True, False], [True, False]], [[False, False], [False, False]]])
    assert torch.equal(net.erased(maps_a, torch.tensor([[True, False]]))[0], expected)
    torch.testing.assert_close(maps_b[0, 0], torch.tensor([[0.0, 0.4], [0.0, 0.8]]))  # f1 with E_0 zeroed
    torch.testing.assert_close(maps_b[0, 1], torch.tensor(F0))  # untouched


def test_erasing_equals_b_on_explicitly_erased_features():
    torch.manual_seed(0)
    net, _ = build_classifier("acol", "smallcnn", "none", 4, {"delta": 0.5})
    net.eval()
    feats = net.features(torch.randn(2, 3, 48, 40)).detach()
    classes = torch.tensor([[True, False, True, False], [False, True, True, True]])
    maps_a, maps_b = net.branch_maps(feats, classes)
    a = torch.relu(maps_a)
    above = a / a.flatten(2).amax(2)[..., None, None] >= 0.5
    assert 0 < above.sum() < above.numel()
    for b in range(2):
        for c in range(4):
            keep = ~(above[b, c] & classes[b, c])  # erased: only the chosen classes, only where >= delta
            by_hand = net.classifier_b(feats[b:b + 1] * keep)[0, c]
            torch.testing.assert_close(maps_b[b, c], by_hand, rtol=1e-5, atol=1e-6)


def test_fused_map_is_the_max_of_the_normalised_branches():
    net = _hand_net([[1, 0], [0, 1]], [[0, 1], [1, 0]])
    out = get_map_method("acol")(net, _features(), torch.tensor([[True, False]]))
    # A_0 norm = f0; B_0 = f1 erased at (0,0), (1,0) -> [[0, .4], [0, .8]] / .8; max of the two:
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 0.5], [0.7, 1.0]]))
    assert (out[0, 1] == 0).all()  # not requested
    cam = get_map_method("cam")(net, _features(), torch.tensor([[True, False]]))
    torch.testing.assert_close(cam[0, 0], torch.tensor(F0))  # cam of an ACoL net: A's map


def test_b_loss_sends_no_gradient_through_erased_positions():
    net = _hand_net([[1, 0]], [[1, 1]])  # one class: A_0 = f0, B_0 = f0 + f1
    x = _features().requires_grad_(True)
    losses = net.training_losses(x, torch.tensor([[1.0]]))
    (grad_b,) = torch.autograd.grad(losses["b"], x, retain_graph=True)
    (grad_a,) = torch.autograd.grad(losses["a"], x)
    erased = torch.tensor([[True, False], [True, False]])
    assert (grad_b[0, :, erased] == 0).all()  # both channels, at (0,0) and (1,0)
    assert (grad_b[0, :, ~erased] != 0).all()
    # d BCE / d x at a kept position = (sigmoid(S_B) - 1) / 4, S_B = (0.5 + 0.4 + 0.2 + 0.8) / 4
    torch.testing.assert_close(grad_b[0, 0, 0, 1], (torch.sigmoid(torch.tensor(1.9 / 4)) - 1) / 4)
    assert (grad_a[0, 0] != 0).all()  # A sees every position


def test_one_training_step_lowers_both_losses():
    torch.manual_seed(0)
    net, _ = build_classifier("acol", "smallcnn", "none", 3, {"delta": 0.6})
    net.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]]).float()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    before = training_losses(net, x, y)
    assert set(before) == {"a", "b"}
    opt.zero_grad()
    sum(before.values()).backward()
    opt.step()
    after = training_losses(net, x, y)
    assert after["a"] < before["a"] - 0.01 and after["b"] < before["b"] - 0.01


def test_predicted_classes_sigmoid_above_half_else_top1():
    scores = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -1.0, -2.0]])
    assert predicted_classes(scores).tolist() == [[True, False, True], [False, True, False]]


def test_delta_travels_in_the_checkpoint_and_config(tmp_path):
    cfg = config_from_dict({"classifier": {"model": "acol", "acol": {"delta": 0.75}}})
    assert cfg.classifier.model == "acol" and cfg.classifier.acol.delta == 0.75
    net, bb = build_classifier("acol", "smallcnn", "none", 2, {"delta": 0.75})
    torch.save(classifier_state(net, model="acol", backbone=bb, backbone_name="smallcnn", classes=["a", "b"],
                                background=True, input_size=32), tmp_path / "classifier.pt")
    loaded, _ = load_classifier(tmp_path / "classifier.pt")
    assert isinstance(loaded, ACoLNet) and loaded.delta.item() == pytest.approx(0.75)


def test_acol_maps_need_an_acol_classifier():
    net, _ = build_classifier("cam", "smallcnn", "none", 2)
    with pytest.raises(ConfigError, match="classifier.model: acol"):
        get_map_method("acol")(net.eval(), torch.randn(1, 3, 16, 16), torch.tensor([[True, False]]))


def test_classifiers_share_the_interface_the_call_sites_use():
    """``pipeline.models.Classifier``: the training loop calls ``training_losses``, Score-CAM reads
    ``multilabel``, the acol method takes an ``ACoLNet``; a CAM net's losses default to the BCE of its scores."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for model, parts in (("cam", {"bce"}), ("acol", {"a", "b"})):
        net, _ = build_classifier(model, "smallcnn", "none", 2)
        assert isinstance(net, Classifier) and net.multilabel and is_multilabel(net)
        assert set(training_losses(net, x, y)) == parts
    cam, _ = build_classifier("cam", "smallcnn", "none", 2)
    torch.testing.assert_close(training_losses(cam, x, y)["bce"],
                               nn.functional.binary_cross_entropy_with_logits(cam(x), y))
    assert not is_multilabel(nn.Linear(2, 2))  # any other module: softmax
