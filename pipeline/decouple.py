"""Context decoupling: a second round of the classifier for the classes that the labels bind to a context.

A class that is hardly ever seen without another one (boat on water, face with body) gives an image-level label
no signal that separates the two, so its map spreads over its context. **Context Decoupling Augmentation** (CDA;
Su et al., "Context Decoupling Augmentation for Weakly Supervised Semantic Segmentation", ICCV 2021), trained on
top of the first round's classifier: object instances cut out by the first round's pseudo-masks are pasted onto
training images that hold neither the object nor its context, and the pasted class joins the image's labels. The
classifier sees the object apart from what always surrounds it.

The cut-out bank (``build_bank``) takes, from each training image and each target class among its labels, the
connected components of the class in the refined label map, eroded (``ERODE`` of the image's shorter side, so
that the boundary pixels, where the pseudo-mask is least sure, stay behind), larger than ``MIN_AREA`` of the
image after erosion, and whose mean map score inside is at least ``MIN_SCORE``. A class absent from the image's
labels is never cut out, whatever the label map says.

The targets and their contexts come from the label statistics (``pipeline.label_stats.context_of``), not from
a list of classes in a config. ``run_round`` is the whole round on a run folder: the bank, the fine-tuning
(``classifier_dc.pt``), the round's maps (``maps/<method>_dc/``), with the affinity stage their walk with the first
round's affinity head (``maps/<method>_dc_rw/``), and the refined label sets (``round_two_sets``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import SegDataset, load_dataset, maps_dataset, read_image, read_mask
from pipeline.data.transforms import classifier_train_transform, to_chw
from pipeline.distributed import sample_seed
from pipeline.export import export_refiner
from pipeline.label_stats import context_of, label_stats
from pipeline.maps.generate import generate_maps
from pipeline.maps.io import load_maps
from pipeline.models import load_classifier
from pipeline.refine import DECOUPLED, SUFFIX, label_sets, round_two_sets
from pipeline.refine.affinity import collect, load_head, walk_maps
from pipeline.refine.runner import refine_split
from pipeline.runfolder import save_torch, write_json
from pipeline.saliency import run_prior
from pipeline.train import train_classifier

log = logging.getLogger(__name__)

ERODE = 0.02  # erosion of a cut-out, as a share of its image's shorter side (at least 1 pixel)
MIN_AREA = 0.01  # a cut-out covers at least this share of its image after erosion
MIN_SCORE = 0.3  # a cut-out's mean map score of its class inside
PASTE_SCALE = (0.6, 1.0)  # a cut-out is pasted at this range of its own size (relative to the host's side)


@dataclass(frozen=True)
class CutOut:
    cls: int  # foreground class index (0..C-1)
    source: str  # the image id it was cut from
    patch: np.ndarray  # [h, w, 3] uint8 RGB, the component's bounding box
    mask: np.ndarray  # [h, w] bool, the eroded component
    rel_size: float  # the patch's longer side over its image's shorter side


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def cut_outs(image: np.ndarray, label: np.ndarray, maps: dict[int, np.ndarray], classes: list[int],
             background: bool, source: str = "") -> list[CutOut]:
    """The cut-outs of ``classes`` (foreground indices, all among the image's labels) from one image: the eroded
    components of each class in ``label`` (label index space) with a mean score of ``maps[c]`` >= MIN_SCORE."""
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


def summary(cuts: list[CutOut], classes: list[str]) -> dict[str, dict[str, int]]:
    """Class name -> its number of cut-outs, for the classes that have any."""
    return {classes[c]: {"cut_outs": sum(o.cls == c for o in cuts)} for c in sorted({o.cls for o in cuts})}


def build_bank(ds: SegDataset, label_dir: Path, maps_dir: Path, targets: list[int] | set[int]) -> list[CutOut]:
    """The cut-outs of every class of ``targets`` from the images of ``ds`` whose labels hold it."""
    cuts: list[CutOut] = []
    for s in tqdm(ds.samples, desc="cut-out bank", leave=False):
        present = [c for c in s.labels if c in targets]
        if not present:
            continue
        image = read_image(s.image_path)
        label = read_mask(label_dir / f"{s.id}.png", image.shape[:2])
        maps, classes = load_maps(maps_dir / f"{s.id}.npz", ds.classes)
        by_class = {int(c): m for c, m in zip(classes, maps, strict=True)}
        cuts += cut_outs(image, label, by_class, present, ds.background, s.id)
    return cuts


def paste(host: np.ndarray, cut: CutOut, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``host`` with ``cut`` pasted at a random scale (PASTE_SCALE of its relative size, never beyond the host),
    a random mirror and a random place wholly inside -> (the new image, the bool mask of the pasted pixels)."""
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

    With probability ``paste_prob`` image ``i`` gets a cut-out of a target class that neither it nor its labels'
    classes hold as context (``hosts``), and that class joins its labels. Sample ``i`` of epoch ``e`` draws from
    ``sample_seed(seed, e, i)``, as the first round's images do."""

    def __init__(self, ds: SegDataset, cuts: list[CutOut], context: dict[int, list[int]], transform,
                 paste_prob: float, seed: int, progress: bool = True):
        self.images = [read_image(s.image_path) for s in tqdm(ds.samples, desc="decode", leave=False,
                                                               disable=not progress)]
        self.labels = [set(s.labels) for s in ds.samples]
        self.num_classes = ds.num_classes
        self.cuts, self.transform, self.paste_prob, self.seed, self.epoch = cuts, transform, paste_prob, seed, 0
        # the cut-outs each image may host: not its own classes, and none of their contexts in its labels
        self.hosts = [[k for k, o in enumerate(cuts)
                       if o.cls not in labels and not labels & set(context.get(o.cls, ()))]
                      for labels in self.labels]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, set[int]]:
        """Image ``i``, pasted or not, and its labels, before the transform."""
        image, labels = self.images[i], self.labels[i]
        choices = self.hosts[i]
        if choices and rng.random() < self.paste_prob:
            cut = self.cuts[choices[int(rng.integers(len(choices)))]]
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


# --------------------------------------------------------------------------------------------------- the round


def round_targets(cfg: Config, ds: SegDataset) -> dict[int, list[int]]:
    """The classes of the round -> their contexts (foreground indices), from the label statistics of ``ds``:
    class b is a's context where P(b | a) >= ``decouple.context``."""
    stats = label_stats(ds.classes, [s.labels for s in ds.samples])
    index = {c: i for i, c in enumerate(ds.classes)}
    return {index[a]: [index[b] for b in bs] for a, bs in context_of(stats, cfg.decouple.context).items()}


def cut_out_source(cfg: Config) -> str:
    """The first round's label set the cut-outs come from: the one the export stage would take from it."""
    sets = label_sets(cfg, round_two=False)
    return export_refiner(cfg.export.refiner if cfg.export.refiner in sets else "auto", list(sets))


def run_round(cfg: Config, device: torch.device, tag: str) -> dict[str, Any]:
    """The decoupled round on the run folder ``cfg.run_dir``, after the first round's refine (and affinity) stages:
    writes ``decouple.json``, ``classifier_dc.pt``, ``decouple_log.json``, the round's maps and label sets. ``tag``
    names the inputs: an interrupted fine-tuning resumes from its resume file only under the same tag. Returns the
    round's summary (``classes`` empty where no class is bound to a context)."""
    run_dir, d, method = cfg.run_path, cfg.decouple, cfg.refine.method
    train_ds = load_dataset(cfg.data, cfg.data.train_split)
    context = round_targets(cfg, train_ds)
    if not context:
        log.info("decouple: no class is bound to a context (P(b | a) >= %s): no second round", d.context)
        return {"classes": []}
    source = cut_out_source(cfg)
    mapped = maps_dataset(cfg)
    have = {s.id for s in mapped.samples}
    train_ds.samples = [s for s in train_ds.samples if s.id in have]  # the bank needs their maps and labels
    names = train_ds.classes
    log.info("decouple: %s (contexts %s); cut-outs from %s", ", ".join(names[c] for c in context),
             "; ".join(f"{names[a]}: {', '.join(names[b] for b in bs)}" for a, bs in context.items()), source)
    maps = label_sets(cfg, round_two=False)[source]
    cuts = build_bank(train_ds, run_dir / "refined" / source, run_dir / "maps" / maps, set(context))
    write_json(run_dir / "decouple.json", {
        "classes": {names[a]: [names[b] for b in bs] for a, bs in context.items()}, "source": source,
        "bank": summary(cuts, names)})
    log.info("decouple: %d cut-outs", len(cuts))

    net, ckpt = load_classifier(run_dir / "classifier.pt", device)
    net.requires_grad_(True)  # loaded for inference: every weight learns again
    c = dataclasses.replace(cfg.classifier, epochs=d.epochs)
    val_ds = load_dataset(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    items = DecoupledImages(train_ds, cuts, context, classifier_train_transform(c.input_size, ckpt["mean"],
                                                                                ckpt["std"]), d.paste_prob, cfg.seed)
    resume = run_dir / "classifier_dc.resume.pt"
    history = train_classifier(net, list(net.backbone.parameters()), c, train_ds, val_ds, ckpt["mean"], ckpt["std"],
                               device, cfg.seed, resume, tag, train=items)
    save_torch(run_dir / "classifier_dc.pt", {**ckpt, "state_dict": {k: v.detach().cpu()
                                                                     for k, v in net.state_dict().items()}})
    write_json(run_dir / "decouple_log.json", history)

    generate_maps(net, ckpt, mapped, dataclasses.replace(cfg.maps, methods=[method]), run_dir / "maps", device,
                  suffix=DECOUPLED)
    maps_dir, refiners = run_dir / "maps" / (method + DECOUPLED), cfg.refine.refiners
    if cfg.affinity.enabled:  # the first round's affinity head walks the new maps, on the first round's features
        first, _ = load_classifier(run_dir / "classifier.pt", device)
        a = cfg.affinity
        feats = collect(first, ckpt, mapped, [run_dir / "refined" / r for r in a.labels_from], a, device)
        walked = run_dir / "maps" / (method + DECOUPLED + SUFFIX)
        walk_maps(load_head(run_dir / "affinity.pt", feats, a, device), feats, mapped, maps_dir, walked, a, device)
        maps_dir, refiners = walked, a.refiners
    prior = run_prior(run_dir, names) if cfg.saliency.enabled else None
    for name, out in zip(refiners, round_two_sets(cfg), strict=True):
        refine_split(name, mapped, maps_dir, run_dir / "refined" / out, cfg.refine, ray=cfg.ray,
                     cache_dir=run_dir / "cache", device=cfg.device, prior=prior)
    resume.unlink(missing_ok=True)
    return {"classes": [names[a] for a in context], "cut_outs": len(cuts),
            "val_map": history[-1].get("val_map") if history else None}
