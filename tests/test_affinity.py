"""AffinityNet (pipeline/refine/affinity.py) against its definitions: the taps, the cell labels, the pair loss
over every pair within the radius, and the random walk as dense matrix powers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import AffinityConfig
from pipeline.models.backbones import create_backbone
from pipeline.models.cam_net import CAMNet
from pipeline.refine.affinity import (
    IGNORE,
    AffinityHead,
    _Item,
    cell_labels,
    half_offsets,
    pair_loss,
    random_walk,
    taps,
    train_head,
)


def _cells(h: int, w: int) -> list[tuple[int, int]]:
    return [(y, x) for y in range(h) for x in range(w)]


def _dense_affinity(emb: torch.Tensor, radius: int) -> torch.Tensor:
    """a_ij = exp(-mean |e_i - e_j|) for cells closer than the radius (a_ii = 1), else 0: [n, n]."""
    d, h, w = emb.shape
    e = emb.reshape(d, -1).t()
    pos = torch.tensor(_cells(h, w), dtype=torch.float64)
    near = torch.cdist(pos, pos) < radius
    return torch.exp(-torch.cdist(e, e, p=1) / d) * near


def test_half_offsets_cover_the_disk_once():
    radius = 5
    half = set(half_offsets(radius))
    full = half | {(-dy, -dx) for dy, dx in half}
    disk = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 25}
    assert full == disk and len(half) * 2 == len(disk)


def test_taps_are_the_stage_outputs_from_stride_8_and_the_features():
    net = CAMNet(create_backbone("tf_efficientnet_lite0"), 3).eval()
    x = torch.randn(1, 3, 96, 72)
    body = net.backbone.net
    with torch.no_grad():
        feats = taps(net, x)
        blocks = [body.bn1(body.conv_stem(x))]
        for block in body.blocks:
            blocks.append(block(blocks[-1]))
    assert [f.shape[1] for f in feats] == [40, 112, 320, 1280]  # blocks 2, 4, 6 and the head (stride 4: left out)
    assert [96 // f.shape[-2] for f in feats] == [8, 16, 16, 16]
    for got, block in zip(feats, (3, 5, 7), strict=False):
        torch.testing.assert_close(got, blocks[block])
    torch.testing.assert_close(feats[-1], net.features(x))


def test_taps_of_smallcnn_and_of_a_net_without_stages():
    net = CAMNet(create_backbone("smallcnn"), 3).eval()
    with torch.no_grad():
        feats = taps(net, torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 8, 8), (256, 8, 8)]
    net.taps = ()
    with torch.no_grad():
        assert [f.shape[1] for f in taps(net, torch.randn(1, 3, 64, 64))] == [256]


def test_cell_labels_take_a_label_where_enough_agreeing_pixels_have_it():
    a = np.zeros((16, 16), np.uint8)
    a[:, 8:] = 1
    b = a.copy()
    b[0, 0] = 1  # one of 64 pixels of the top-left cell disagrees: 63/64 >= 0.9
    b[8:12, 0:8] = 1  # half of the bottom-left cell disagrees: ignored
    a[0, 8] = IGNORE  # one ignored pixel in the top-right cell: 63/64
    got = cell_labels([a, b], 2, (2, 2), 0.9)
    assert got.tolist() == [[0, 1], [IGNORE, 1]]
    assert cell_labels([a, b], 2, (2, 2), 0.99).tolist() == [[IGNORE, IGNORE], [IGNORE, 1]]


def _dense_walk(a: torch.Tensor, maps: torch.Tensor, beta: float, steps: int) -> torch.Tensor:
    """The walk of ``maps`` [K,h,w] as a dense matrix power: (D^-1 a^beta)^steps."""
    weights = a**beta
    t = weights / weights.sum(1, keepdim=True)
    k, h, w = maps.shape
    return (torch.linalg.matrix_power(t, steps) @ maps.reshape(k, -1).t()).t().reshape(k, h, w)


def test_pair_loss_is_its_definition_over_every_pair_within_the_radius():
    torch.manual_seed(0)
    h, w, radius = 6, 7, 3
    emb = torch.randn(8, h, w, dtype=torch.float64)
    labels = torch.randint(0, 3, (h, w))
    labels[0, :3] = IGNORE
    a = _dense_affinity(emb, radius)
    lab = labels.flatten()
    same, diff = [], []
    for i in range(h * w):
        for j in range(i + 1, h * w):
            if a[i, j] > 0 and lab[i] != IGNORE and lab[j] != IGNORE:
                (same if lab[i] == lab[j] else diff).append(a[i, j])
    expected = -torch.log(torch.stack(same) + 1e-5).mean() - torch.log(1 + 1e-5 - torch.stack(diff)).mean()
    torch.testing.assert_close(pair_loss(emb, labels, radius), expected)
    assert pair_loss(emb, torch.full((h, w), IGNORE), radius).item() == 0.0


def test_random_walk_is_the_row_normalised_transition_matrix_to_the_power_steps():
    torch.manual_seed(1)
    h, w, radius, beta, steps = 5, 6, 3, 4.0, 7
    emb = torch.randn(16, h, w, dtype=torch.float64) * 0.3
    maps = torch.rand(2, h, w, dtype=torch.float64)
    expected = _dense_walk(_dense_affinity(emb, radius), maps, beta, steps)
    torch.testing.assert_close(random_walk(maps, emb, radius, beta, steps), expected)
    ones = torch.ones(1, h, w, dtype=torch.float64)  # T is row-stochastic: a constant map stays constant
    torch.testing.assert_close(random_walk(ones, emb, radius, beta, steps), ones)


def test_random_walk_spreads_over_the_region_and_stops_at_its_edge():
    h, w = 8, 12
    emb = torch.zeros(4, h, w)
    emb[:, :, 6:] = 3.0  # two regions: a = 1 inside each, exp(-3) across their edge
    seed = torch.zeros(1, h, w)
    seed[0, 3:5, 1:3] = 1.0  # the class map covers a small part of the left region
    walked = random_walk(seed, emb, 5, 16.0, 64)[0]
    left, right = walked[:, :6], walked[:, 6:]
    assert left.min() > 0.5 * left.max()  # spread over the whole left region
    assert right.max() < 1e-6 * left.min()  # and not across the edge (exp(-3)^16 ~ 1e-21 per step)


def _two_regions(h: int, w: int, edge: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Cell labels 0 left of column ``edge`` and 1 from it on, and random features (a fine and a coarse level)."""
    torch.manual_seed(0)
    labels = torch.zeros(h, w, dtype=torch.long)
    labels[:, edge:] = 1
    return labels, [torch.randn(6, h, w).half(), torch.randn(10, h // 2, w // 2).half()]


def test_training_separates_the_embeddings_of_differently_labelled_cells():
    h, w = 8, 8
    labels, feats = _two_regions(h, w, 4)
    feats[0][:, :, 4:] += 2  # the features tell the regions apart; the head must learn to
    item = _Item("x", feats, labels)
    cfg = AffinityConfig(enabled=True, epochs=30, accumulate=1, radius=3, dim=16, lr=1e-2)
    head, losses = train_head([item], cfg, torch.device("cpu"), seed=0)
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        loss = pair_loss(head([f[None] for f in feats])[0], labels, 3).item()
    assert loss < 0.3
    assert isinstance(head, AffinityHead) and not head.training


@pytest.mark.parametrize("levels", [[40], [40, 112, 1280]])
def test_head_upsamples_every_level_to_the_finest_grid(levels):
    sizes = [(12, 9), (6, 5), (3, 3)]
    head = AffinityHead(levels, dim=32)
    out = head([torch.randn(2, c, *sizes[i]) for i, c in enumerate(levels)])
    assert out.shape == (2, 32, 12, 9)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in head.modules())
    assert math.isfinite(out.sum().item())
