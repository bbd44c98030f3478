"""Faithfulness metrics against values worked out by hand on a 4x4 image and a linear classifier.

The classifier: mean 0 and std 1 (normalised input = pixels), class 0's logit = the sum of the pixel values
over the object R (the top-left 2x2 square, 4 of the 16 pixels; each of the 3 channels weighs 1/3) - 2;
class 1's logit = 3 - the sum over the 12 other pixels. The image is 1 on R and 0.5 elsewhere, so class 0
has logit 4 - 2 = 2 and class 1 has logit 3 - 6 = -3; p = sigmoid (the net is multi-label).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import config_from_dict
from pipeline.metrics import average_drop, energy_pointing_game, increase_in_confidence
from pipeline.metrics.faithfulness import (
    Accumulator,
    Probe,
    auc,
    gaussian_blur,
    pixel_ranks,
    step_counts,
)
from pipeline.models import Classifier
from stages.faithfulness import faithfulness_of_run

H = W = 4
R = np.zeros((H, W), bool)
R[:2, :2] = True


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


class LinearNet(Classifier):
    """logit_c = sum over channels and pixels of w_c * x + b_c."""

    multilabel = True

    def __init__(self):
        super().__init__()
        r = torch.from_numpy(R).float()
        w = torch.stack([r, -(1 - r)])[:, None].expand(2, 3, H, W) / 3.0
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.b = nn.Parameter(torch.tensor([-2.0, 3.0]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", x, self.w) + self.b


IMAGE = torch.from_numpy(np.where(R, 1.0, 0.5)).float().expand(3, H, W).clone()
ORACLE = torch.from_numpy(R).float()
MAPS = {"oracle": ORACLE, "uniform": torch.full((H, W), 0.5), "inverted": 1 - ORACLE,
        "random": torch.rand((H, W), generator=torch.Generator().manual_seed(3))}


def probe(**kw) -> Probe:
    opts = {"steps": 4, "batch": 5, "deletion_base": "black", "insertion_base": "black", **kw}
    return Probe(LinearNet(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), **opts)


def test_the_linear_net_gives_the_logits_worked_out_by_hand():
    p = probe()(IMAGE[None])[0]
    assert p.tolist() == pytest.approx([sig(2), sig(-3)], abs=1e-6)


def test_average_drop_and_increase_in_confidence_by_hand():
    names = ["oracle", "uniform", "inverted"]
    s = probe().scores(IMAGE, torch.stack([MAPS[n] for n in names]), [0, 0, 0])
    # x * M: the oracle keeps R (logit 2), the uniform map halves it (4 * 0.5 - 2 = 0), the inverted one blanks it
    assert s.y.tolist() == pytest.approx([sig(2)] * 3, abs=1e-6)
    assert s.o.tolist() == pytest.approx([sig(2), sig(0), sig(-2)], abs=1e-6)
    y = sig(2)
    expected = 100 * (0 + (y - 0.5) / y + (y - sig(-2)) / y) / 3
    assert average_drop(s.y, s.o) == pytest.approx(expected, abs=1e-4)
    assert increase_in_confidence(s.y, s.o) == 0.0
    # class 1: the oracle map of R blanks the 12 pixels that lower its score: 3 - 0 > 3 - 6, confidence rises
    s1 = probe().scores(IMAGE, ORACLE[None], [1])
    assert (s1.y[0], s1.o[0]) == pytest.approx((sig(-3), sig(3)), abs=1e-6)
    assert increase_in_confidence(s1.y, s1.o) == 100.0 and average_drop(s1.y, s1.o) == 0.0
    assert average_drop([0.8, 0.5], [0.4, 0.6]) == pytest.approx(25.0)  # (0.4/0.8 + 0) / 2
    assert increase_in_confidence([0.8, 0.5, 0.1], [0.4, 0.6, 0.2]) == pytest.approx(200 / 3)


def test_deletion_and_insertion_curves_and_auc_by_hand():
    s = probe().scores(IMAGE, torch.stack([MAPS["oracle"], MAPS["inverted"]]), [0, 0])
    hi, lo = sig(2), sig(-2)
    assert s.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1]  # 16 pixels, 4 steps of 4
    # the oracle's first 4 pixels are R: gone at step 1; the inverted map removes R last
    np.testing.assert_allclose(s.deletion, [[hi, lo, lo, lo, lo], [hi, hi, hi, hi, lo]], atol=1e-6)
    np.testing.assert_allclose(s.insertion, [[lo, hi, hi, hi, hi], [lo, lo, lo, lo, hi]], atol=1e-6)
    trapezoid = lambda c: 0.25 * (c[0] / 2 + c[1] + c[2] + c[3] + c[4] / 2)  # noqa: E731
    np.testing.assert_allclose(auc(s.deletion, s.fractions),
                               [trapezoid([hi, lo, lo, lo, lo]), trapezoid([hi, hi, hi, hi, lo])], atol=1e-6)
    assert auc([0.0, 1.0], [0.0, 1.0]) == pytest.approx(0.5)
    np.testing.assert_allclose(auc(s.insertion, s.fractions), [0.25 * (lo / 2 + 3 * hi + hi / 2),
                                                               0.25 * (lo / 2 + 3 * lo + hi / 2)], atol=1e-6)


def test_oracle_map_has_the_best_insertion_and_deletion_auc_and_pointing_game_one():
    names = list(MAPS)
    gt = np.where(R, 1, 0).astype(np.uint8)  # label 1 = class 0 (with a background class)
    maps = torch.stack([MAPS[n] for n in names])
    for base in ("blur", "black"):
        s = probe(insertion_base=base, deletion_base=base, blur_sigma=0.1).scores(IMAGE, maps, [0] * len(names))
        ins, dele = dict(zip(names, auc(s.insertion, s.fractions), strict=True)), \
            dict(zip(names, auc(s.deletion, s.fractions), strict=True))
        assert max(ins, key=ins.get) == "oracle" and min(dele, key=dele.get) == "oracle", (base, ins, dele)
        assert ins["oracle"] > ins["uniform"] > ins["inverted"]
    epg = dict(zip(names, energy_pointing_game(maps.numpy(), gt, [1] * len(names)), strict=True))
    assert epg["oracle"] == 1.0 and epg["inverted"] == 0.0 and epg["uniform"] == pytest.approx(4 / 16)
    assert max(epg, key=epg.get) == "oracle"


def test_energy_pointing_game_by_hand_leaves_out_void_pixels():
    gt = np.array([[1, 1, 0], [0, 255, 0]], np.uint8)
    maps = np.array([[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]],  # 0.75 inside, 1.0 in all once the void pixel is out
                     [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # no energy: 0
                     [[0.2, 0.2, 0.2], [0.2, 0.2, 0.2]]])  # class 2: no GT pixel -> NaN
    out = energy_pointing_game(maps, gt, [1, 1, 2])
    assert out[0] == pytest.approx(0.75) and out[1] == 0.0 and math.isnan(out[2])


def test_the_blurred_insertion_base_starts_the_insertion_curve():
    p = probe(insertion_base="blur", blur_sigma=0.25)  # 0.25 x 4 px = 1 px
    blurred = gaussian_blur(IMAGE, 1.0)
    assert float(blurred.sum()) < float(IMAGE.sum()) + 1e-4 and not torch.allclose(blurred, IMAGE)
    s = p.scores(IMAGE, ORACLE[None], [0])
    assert s.insertion[0, 0] == pytest.approx(float(p(blurred[None])[0, 0]), abs=1e-6)
    assert s.insertion[0, -1] == pytest.approx(sig(2), abs=1e-6) and s.deletion[0, -1] == pytest.approx(sig(-2))
    flat = torch.full((3, 5, 7), 0.3)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat)  # edges replicated: a flat image stays flat


def test_chunking_does_not_change_the_scores_and_ranks_follow_the_map():
    maps = torch.stack(list(MAPS.values()))
    a = probe(batch=1).scores(IMAGE, maps, [0, 1, 0, 1])
    b = probe(batch=1000).scores(IMAGE, maps, [0, 1, 0, 1])
    np.testing.assert_allclose(a.deletion, b.deletion, atol=1e-6)
    np.testing.assert_allclose(a.insertion, b.insertion, atol=1e-6)
    ranks = pixel_ranks(MAPS["random"][None])[0]
    values = MAPS["random"].flatten()
    assert torch.equal(values[torch.argsort(ranks)], values.sort(descending=True).values)
    assert torch.equal(pixel_ranks(ORACLE[None]), pixel_ranks(ORACLE[None]))  # ties: a fixed order
    assert step_counts(10, 4).tolist() == [0, 2, 5, 8, 10]


def test_summary_keys_and_means():
    acc = Accumulator.empty()
    s = probe().scores(IMAGE, torch.stack([MAPS["oracle"], MAPS["uniform"]]), [0, 0])
    acc.add(s, np.array([1.0, np.nan]))
    out = acc.summary()
    assert {"average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "energy_pointing_game",
            "pairs", "images", "curves"} <= set(out)
    assert out["pairs"] == 2 and out["images"] == 1 and out["energy_pointing_game"] == 1.0  # NaN left out
    assert out["deletion_auc"] == pytest.approx(float(auc(s.deletion, s.fractions).mean()), abs=1e-4)
    assert len(out["curves"]["deletion"]) == 5 and out["curves"]["fraction"] == [0, 0.25, 0.5, 0.75, 1]
    assert Accumulator.empty().summary()["pairs"] == 0


def test_a_run_without_classifier_is_not_scored(tmp_path, caplog):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run")})
    caplog.set_level("WARNING")
    assert faithfulness_of_run(cfg, None, {}) == {}  # maps made elsewhere: evaluate still scores them against GT
    assert "the faithfulness of the maps is not scored" in caplog.text
