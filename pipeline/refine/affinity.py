"""AffinityNet: Ahn & Kwak 2018, "Learning Pixel-level Semantic Affinity with Image-level Supervision for
Weakly Supervised Semantic Segmentation" (CVPR).

The refined labels teach a small head on the frozen classifier which nearby positions belong together; a
random walk along those affinities then spreads each class map over its object and stops at its edges.

1. Labels (``cell_labels``): the pixels where the refiners of ``affinity.labels_from`` agree, pooled to the
   grid of cells of ``GRID_STRIDE`` (8) pixels. A cell takes label l where at least ``cell_agreement`` of its
   pixels have l; the other cells are ignored.
2. Head (``AffinityHead``): the classifier's stage features from stride 8 on and its final features
   (``taps``; for EfficientNet-Lite0 blocks 2, 4, 6 and the head, as AffinityNet taps three stages of its
   ResNet), each through a 1x1 convolution, upsampled to the grid, ReLU, concatenated, then a 1x1
   convolution to ``dim`` channels e_i per cell.
3. Affinities (``pair_affinities``) of the cells within ``radius`` of each other: a_ij = exp(-mean_k |e_ik - e_jk|).
   The loss (``pair_loss``) is -log a_ij averaged over the labelled pairs of equal label, plus -log(1 - a_ij)
   averaged over those of different labels. (Both papers split the equal pairs into foreground and background
   pairs and average three terms; a dataset without a background class has only the two.)
4. Random walk (``random_walk``): W = a^beta within the radius (a_ii = 1), T = D^-1 W with D the row sums of W.
   Each class map, average-pooled to the grid, takes ``steps`` steps m <- T m; it is then upsampled to the
   image and divided by its maximum, like every map of the run folder.

The features of the whole split are computed once and kept (float16, on the CPU) for training and the walk.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.config import AffinityConfig
from pipeline.data import SegDataset, read_image
from pipeline.data.dataset import read_mask
from pipeline.device import autocast
from pipeline.maps.inference import normalise_max, to_tensor
from pipeline.maps.io import load_maps, save_maps
from pipeline.models import Classifier

log = logging.getLogger(__name__)

GRID_STRIDE = 8  # the cells of the labels, the head and the walk, in pixels
IGNORE = 255


def taps(net: Classifier, x: torch.Tensor) -> list[torch.Tensor]:
    """The classifier's features of ``x`` [B,3,H,W], finest first: the outputs of its backbone's stages
    (``net.taps``, from ``Backbone.taps``) at ``GRID_STRIDE`` or coarser, then ``net.features(x)``."""
    names = net.taps
    modules = dict(net.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
             for name in names]
    try:
        final = net.features(x)
    finally:
        for h in hooks:
            h.remove()
    gh, gw = (math.ceil(s / GRID_STRIDE) for s in x.shape[-2:])
    return [f for f in (seen[name] for name in names) if f.shape[-2] <= gh and f.shape[-1] <= gw] + [final]


class AffinityHead(nn.Module):
    """Per-level 1x1 convolutions (64, 128, 256... channels, finest first), upsampled to the finest level,
    ReLU, concatenated, then a 1x1 convolution to ``dim`` channels."""

    def __init__(self, channels: list[int], dim: int = 256):
        super().__init__()
        widths = [min(256, 64 * 2**i) for i in range(len(channels))]
        self.levels = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(channels, widths, strict=True))
        self.out = nn.Conv2d(sum(widths), dim, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        parts = [F.relu(F.interpolate(conv(f.float()), size=size, mode="bilinear", align_corners=False))
                 for conv, f in zip(self.levels, feats, strict=True)]
        return self.out(torch.cat(parts, 1))


def half_offsets(radius: int) -> list[tuple[int, int]]:
    """The offsets (dy, dx) with 0 < |(dy, dx)| < radius, one of each pair +-(dy, dx)."""
    return [(dy, dx) for dy in range(radius) for dx in range(-radius + 1, radius)
            if 0 < dy * dy + dx * dx < radius * radius and (dy > 0 or dx > 0)]


def _pairs(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """The windows of the cells p and p + (dy, dx) (dy >= 0) that both lie in an h x w grid."""
    xs, xe = max(0, -dx), min(w, w - dx)
    return (slice(0, h - dy), slice(xs, xe)), (slice(dy, h), slice(xs + dx, xe + dx))


def pair_affinities(emb: torch.Tensor, radius: int) -> list[torch.Tensor]:
    """The embeddings [D,h,w] -> per offset of ``half_offsets(radius)``, a_ij = exp(-mean_k |e_ik - e_jk|)
    over its window."""
    h, w = emb.shape[-2:]
    result = []
    for dy, dx in half_offsets(radius):
        (ay, ax), (by, bx) = _pairs(h, w, dy, dx)
        result.append(torch.exp(-(emb[:, ay, ax] - emb[:, by, bx]).abs().mean(0)))
    return result


def pair_loss(emb: torch.Tensor, labels: torch.Tensor, radius: int, eps: float = 1e-5) -> torch.Tensor:
    """-log a over the labelled pairs of equal label, averaged, plus -log(1 - a) over those of different labels,
    averaged (a term without pairs is 0). emb [D,h,w], labels [h,w] int (``IGNORE`` = unlabelled)."""
    h, w = labels.shape
    same, diff = [], []
    for (dy, dx), a in zip(half_offsets(radius), pair_affinities(emb, radius), strict=True):
        (ay, ax), (by, bx) = _pairs(h, w, dy, dx)
        la, lb = labels[ay, ax], labels[by, bx]
        known = (la != IGNORE) & (lb != IGNORE)
        same.append(a[known & (la == lb)])
        diff.append(a[known & (la != lb)])
    same_a, diff_a = torch.cat(same), torch.cat(diff)
    loss = emb.sum() * 0  # keeps the graph: an image without labelled pairs adds no gradient
    if same_a.numel():
        loss = loss - torch.log(same_a + eps).mean()
    if diff_a.numel():
        loss = loss - torch.log(1 + eps - diff_a).mean()
    return loss


def transition(emb: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W = a^beta within the radius, a_ii = 1, as a sparse [n,n] tensor (n = h*w cells), and its row sums D."""
    h, w = emb.shape[-2:]
    index = torch.arange(h * w, device=emb.device).view(h, w)
    rows, cols, vals = [index.flatten()], [index.flatten()], [emb.new_ones(h * w)]
    for (dy, dx), a in zip(half_offsets(radius), pair_affinities(emb, radius), strict=True):
        (ay, ax), (by, bx) = _pairs(h, w, dy, dx)
        i, j, v = index[ay, ax].flatten(), index[by, bx].flatten(), a.flatten() ** beta
        rows += [i, j]
        cols += [j, i]
        vals += [v, v]
    weights = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals),
                                      (h * w, h * w), check_invariants=False).coalesce()
    return weights, torch.sparse.sum(weights, 1).to_dense()


def random_walk(maps: torch.Tensor, emb: torch.Tensor, radius: int, beta: float, steps: int) -> torch.Tensor:
    """maps [K,h,w] on the grid of emb [D,h,w] -> maps after ``steps`` steps m <- D^-1 W m."""
    k, h, w = maps.shape
    weights, degree = transition(emb, radius, beta)
    with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        weights = weights.to_sparse_csr()  # its products are much faster than COO's
    m = maps.reshape(k, h * w).t()
    for _ in range(steps):
        m = (weights @ m) / degree[:, None]
    return m.t().reshape(k, h, w)


def cell_labels(labels: list[np.ndarray], num_labels: int, grid: tuple[int, int], agreement: float) -> torch.Tensor:
    """Label maps [H,W] of several refiners (values < num_labels, or 255) -> [gh,gw] int64 cell labels: where
    they agree, pooled to the grid; a cell whose pixels have one label in at least ``agreement`` of them takes
    it, every other cell is ``IGNORE``."""
    first = labels[0].astype(np.int64)
    agreed = np.where(np.all([lab == labels[0] for lab in labels[1:]], axis=0) & (first != IGNORE), first, num_labels)
    onehot = F.one_hot(torch.from_numpy(agreed), num_labels + 1).permute(2, 0, 1).float()[None]
    share, label = F.adaptive_avg_pool2d(onehot, grid)[0].max(0)
    return torch.where((share >= agreement) & (label < num_labels), label, torch.full_like(label, IGNORE))


@dataclass
class _Item:
    id: str
    feats: list[torch.Tensor]  # [c,h,w] float16 on the CPU, finest first
    labels: torch.Tensor  # [h,w] of the finest level


def collect(net: Classifier, ckpt: dict, ds: SegDataset, label_dirs: list[Path], cfg: AffinityConfig,
            device: torch.device) -> list[_Item]:
    """The classifier's features and the cell labels of every image of ``ds``."""
    items = []
    with torch.no_grad(), autocast(device):
        for s in tqdm(ds.samples, desc="affinity features", leave=False):
            image = read_image(s.image_path)
            feats = [f[0].half().cpu() for f in taps(net, to_tensor(image, ckpt["mean"], ckpt["std"], device))]
            labels = [read_mask(d / f"{s.id}.png", image.shape[:2]) for d in label_dirs]
            items.append(_Item(s.id, feats, cell_labels(labels, ds.num_labels, tuple(feats[0].shape[-2:]),
                                                        cfg.cell_agreement)))
    return items


def train_head(items: list[_Item], cfg: AffinityConfig, device: torch.device,
               seed: int) -> tuple[AffinityHead, list[float]]:
    """Train the head on the items' pairs (AdamW, ``accumulate`` images a step); returns it and each epoch's loss."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = AffinityHead([f.shape[0] for f in items[0].feats], cfg.dim).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    for epoch in tqdm(range(cfg.epochs), desc="affinity epochs", leave=False):
        total = 0.0
        order = torch.randperm(len(items), generator=gen).tolist()
        for n, i in enumerate(order):
            item = items[i]
            emb = head([f[None].to(device) for f in item.feats])[0]
            loss = pair_loss(emb, item.labels.to(device), cfg.radius)
            (loss / cfg.accumulate).backward()
            total += loss.item()
            if (n + 1) % cfg.accumulate == 0 or n + 1 == len(order):
                opt.step()
                opt.zero_grad(set_to_none=True)
        losses.append(total / len(items))
        log.info("affinity: epoch %d/%d, loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    return head.eval(), losses


def load_head(path: Path, items: list[_Item], cfg: AffinityConfig, device: torch.device) -> AffinityHead:
    """The head the affinity stage trained and saved (``affinity.pt``), for features like ``items``', in eval mode."""
    head = AffinityHead([f.shape[0] for f in items[0].feats], cfg.dim).to(device)
    head.load_state_dict(torch.load(path, map_location=device)["state_dict"])
    return head.eval()


def walk_maps(head: AffinityHead, items: list[_Item], ds: SegDataset, maps_dir: Path, out_dir: Path,
              cfg: AffinityConfig, device: torch.device) -> None:
    """Each image's maps of ``maps_dir`` after the random walk -> ``out_dir/<id>.npz`` (same classes)."""
    with torch.no_grad():
        for item in tqdm(items, desc="affinity walk", leave=False):
            maps, classes = load_maps(maps_dir / f"{item.id}.npz", ds.classes)
            if not len(classes):
                save_maps(out_dir / f"{item.id}.npz", maps, classes, ds.classes)
                continue
            emb = head([f[None].to(device) for f in item.feats])[0]
            grid = F.adaptive_avg_pool2d(torch.from_numpy(maps).to(device), emb.shape[-2:])
            walked = random_walk(grid, emb, cfg.radius, cfg.beta, cfg.steps)
            walked = F.interpolate(walked[None], size=maps.shape[-2:], mode="bilinear", align_corners=False)[0]
            save_maps(out_dir / f"{item.id}.npz", normalise_max(walked.clamp_min(0)).cpu().numpy(), classes,
                      ds.classes)
