"""Context decoupling: a second round of the classifier for the classes that the labels bind to a context.

A class that is hardly ever seen without another one (boat on water, face with body) gives an image-level label
no signal that separates the two, so its map spreads over its context. Two label-only remedies, both trained
on top of the first round's classifier:

- **Context Decoupling Augmentation** (CDA; Su et al., "Context Decoupling Augmentation for Weakly Supervised
  Semantic Segmentation", ICCV 2021): object instances cut out by the first round's pseudo-masks are pasted
  onto training images that hold neither the object nor its context, and the pasted class joins the image's
  labels. The classifier sees the object apart from what always surrounds it.
- **Context-only crops as negatives** (after W-OoD; Lee et al., "Weakly Supervised Semantic Segmentation using
  Out-of-Distribution Data", CVPR 2022): crops of the target's own images that the pseudo-mask says hold its
  context but not the object (water without the boat), labelled with the classes the crop holds. They show the
  context without the object, which the dataset's images never do.

The cut-out bank (``build_bank``) takes, from each training image and each target class among its labels, the
connected components of the class in the refined label map, eroded (``ERODE`` of the image's shorter side, so
that the boundary pixels, where the pseudo-mask is least sure, stay behind), larger than ``MIN_AREA`` of the
image after erosion, and whose mean map score inside is at least ``MIN_SCORE``. A class absent from the image's
labels is never cut out, whatever the label map says.

The targets and their contexts come from the label statistics (``pipeline.label_stats.context_of``), not from
a list of classes in a config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.data import IGNORE, SegDataset, read_image, read_mask
from pipeline.data.transforms import to_chw
from pipeline.distributed import sample_seed
from pipeline.maps.io import load_maps

log = logging.getLogger(__name__)

ERODE = 0.02  # erosion of a cut-out, as a share of its image's shorter side (at least 1 pixel)
MIN_AREA = 0.01  # a cut-out covers at least this share of its image after erosion
MIN_SCORE = 0.3  # a cut-out's mean map score of its class inside
PASTE_SCALE = (0.6, 1.0)  # a cut-out is pasted at this range of its own size (relative to the host's side)
CROP_SIDE = (0.35, 0.6)  # a context crop's side, as a share of its image's side
CROP_TRIES = 12  # random windows tried per image for a context crop
CROP_MARGIN = 0.05  # the target's pixels, dilated by this share of the shorter side, stay out of a crop


@dataclass(frozen=True)
class CutOut:
    cls: int  # foreground class index (0..C-1)
    source: str  # the image id it was cut from
    patch: np.ndarray  # [h, w, 3] uint8 RGB, the component's bounding box
    mask: np.ndarray  # [h, w] bool, the eroded component
    rel_size: float  # the patch's longer side over its image's shorter side


@dataclass(frozen=True)
class ContextCrop:
    source: str
    image: np.ndarray  # [h, w, 3] uint8 RGB
    labels: tuple[int, ...]  # the classes of the pseudo-mask inside the crop (foreground indices, sorted)


def _disk(radius: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def cut_outs(image: np.ndarray, label: np.ndarray, maps: dict[int, np.ndarray], classes: list[int],
             background: bool, source: str = "") -> list[CutOut]:
    """The cut-outs of ``classes`` (foreground indices, all among the image's labels) from one image: the eroded
    components of each class in ``label`` (label index space) with a mean score of ``maps[c]`` >= MIN_SCORE."""
    import cv2

    h, w = label.shape
    side = min(h, w)
    kernel = _disk(max(1, round(ERODE * side)))
    out = []
    for c in classes:
        region = (label == c + int(background)).astype(np.uint8)
        if not region.any():
            continue
        region = cv2.erode(region, kernel)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
        for k in range(1, n):
            x, y, bw, bh, area = (int(v) for v in stats[k])
            if area < MIN_AREA * h * w:
                continue
            inside = comp == k
            if c not in maps or float(maps[c][inside].mean()) < MIN_SCORE:
                continue
            box = (slice(y, y + bh), slice(x, x + bw))
            out.append(CutOut(c, source, image[box].copy(), inside[box].copy(), max(bh, bw) / side))
    return out


def context_crop(image: np.ndarray, label: np.ndarray, avoid: list[int], background: bool,
                 rng: np.random.Generator) -> ContextCrop | None:
    """A window of the image that holds none of the ``avoid`` classes' pixels (dilated by CROP_MARGIN) and no
    ignored pixel, labelled with the classes of ``label`` inside it; None when CROP_TRIES windows all fail."""
    import cv2

    h, w = label.shape
    offset = int(background)
    banned = np.isin(label, [c + offset for c in avoid]).astype(np.uint8)
    banned = cv2.dilate(banned, _disk(max(1, round(CROP_MARGIN * min(h, w))))) > 0
    banned |= label == IGNORE
    for _ in range(CROP_TRIES):
        ch, cw = (max(8, int(rng.uniform(*CROP_SIDE) * s)) for s in (h, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        if banned[y:y + ch, x:x + cw].any():
            continue
        values = np.unique(label[y:y + ch, x:x + cw])
        labels = tuple(int(v) - offset for v in values if v != IGNORE and v >= offset)
        if labels:
            return ContextCrop("", image[y:y + ch, x:x + cw].copy(), labels)
    return None


@dataclass
class Bank:
    cut_outs: list[CutOut]
    crops: list[ContextCrop]

    def summary(self, classes: list[str]) -> dict[str, dict[str, int]]:
        return {classes[c]: {"cut_outs": sum(o.cls == c for o in self.cut_outs)}
                for c in sorted({o.cls for o in self.cut_outs})}


def build_bank(ds: SegDataset, label_dir: Path, maps_dir: Path, context: dict[int, list[int]],
               seed: int) -> Bank:
    """The cut-outs of every target class (the keys of ``context``) from the images of ``ds`` that hold it, and
    one context crop per such image: a window holding some of the target's context classes and none of it."""
    rng = np.random.default_rng(seed)
    cuts: list[CutOut] = []
    crops: list[ContextCrop] = []
    for s in tqdm(ds.samples, desc="cut-out bank", leave=False):
        targets = [c for c in s.labels if c in context]
        if not targets:
            continue
        image = read_image(s.image_path)
        label = read_mask(label_dir / f"{s.id}.png", image.shape[:2])
        maps, classes = load_maps(maps_dir / f"{s.id}.npz", ds.classes)
        by_class = {int(c): m for c, m in zip(classes, maps, strict=True)}
        cuts += cut_outs(image, label, by_class, targets, ds.background, s.id)
        crop = context_crop(image, label, targets, ds.background, rng)
        ctx = {b for c in targets for b in context[c]}
        if crop is not None and ctx & set(crop.labels):
            crops.append(ContextCrop(s.id, crop.image, crop.labels))
    return Bank(cuts, crops)


def paste(host: np.ndarray, cut: CutOut, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``host`` with ``cut`` pasted at a random scale (PASTE_SCALE of its relative size, never beyond the host),
    a random mirror and a random place wholly inside -> (the new image, the bool mask of the pasted pixels)."""
    import cv2

    h, w = host.shape[:2]
    ph, pw = cut.mask.shape
    scale = rng.uniform(*PASTE_SCALE) * cut.rel_size * min(h, w) / max(ph, pw)
    scale = min(scale, (h - 1) / ph, (w - 1) / pw)
    nh, nw = max(1, round(ph * scale)), max(1, round(pw * scale))
    patch = cv2.resize(cut.patch, (nw, nh), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(cut.mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
    if not mask.any():  # a sliver shrunk to nothing: keep its centre pixel
        mask[nh // 2, nw // 2] = True
    if rng.random() < 0.5:
        patch, mask = patch[:, ::-1], mask[:, ::-1]
    y, x = int(rng.integers(0, h - nh + 1)), int(rng.integers(0, w - nw + 1))
    out = host.copy()
    window = out[y:y + nh, x:x + nw]
    window[mask] = patch[mask]
    pasted = np.zeros((h, w), bool)
    pasted[y:y + nh, x:x + nw] = mask
    return out, pasted


class DecoupledImages(Dataset):
    """The training images with context decoupling, for the second round of the classifier.

    Item ``i < len(ds)`` is training image i; with probability ``paste_prob`` it gets a cut-out of a target
    class that neither it nor its labels' classes hold as context (``hosts``), and that class joins its
    labels. The items after them are the bank's context crops with their own labels. Sample ``i`` of epoch
    ``e`` draws from ``sample_seed(seed, e, i)``, as the first round's images do."""

    def __init__(self, ds: SegDataset, bank: Bank, context: dict[int, list[int]], transform, paste_prob: float,
                 seed: int, progress: bool = True):
        self.images = [read_image(s.image_path) for s in tqdm(ds.samples, desc="decode", leave=False,
                                                               disable=not progress)]
        self.labels = [set(s.labels) for s in ds.samples]
        self.num_classes = ds.num_classes
        self.bank, self.transform, self.paste_prob, self.seed, self.epoch = bank, transform, paste_prob, seed, 0
        # the cut-outs each image may host: not its own classes, and none of their contexts in its labels
        self.hosts = [[k for k, o in enumerate(bank.cut_outs)
                       if o.cls not in labels and not labels & set(context.get(o.cls, ()))]
                      for labels in self.labels]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) + len(self.bank.crops)

    def item(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, set[int]]:
        """Image ``i`` (pasted or not) or context crop ``i - len(images)``, and its labels, before the transform."""
        if i >= len(self.images):
            crop = self.bank.crops[i - len(self.images)]
            return crop.image, set(crop.labels)
        image, labels = self.images[i], self.labels[i]
        choices = self.hosts[i]
        if choices and rng.random() < self.paste_prob:
            cut = self.bank.cut_outs[choices[int(rng.integers(len(choices)))]]
            image, _ = paste(image, cut, rng)
            labels = labels | {cut.cls}
        return image, labels

    def __getitem__(self, i: int):
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, i))
        image, labels = self.item(i, rng)
        self.transform.set_random_seed(int(rng.integers(2**31)))
        target = np.zeros(self.num_classes, np.float32)
        target[sorted(labels)] = 1.0
        return to_chw(self.transform(image=image)["image"]), torch.from_numpy(target)
