"""Segmenter inference: label probabilities of an image (mirror-averaged), optional dense-CRF post-processing,
scoring against ground truth, and the ``predict`` command (a folder of images -> palette masks + overlays).

An image is resized so that its longest side is the checkpoint's ``input_size`` (as in training), and the
softmax probabilities are resized back to the image. With ``scales`` the network also sees the resized
image scaled by each factor (multi-scale testing, as DeepLab evaluates), and the probabilities are
averaged. The CRF post-processing is the refinement's dense CRF (``pipeline.refine.crf.crf_posterior``,
kernels from ``refine.crf``) with the segmenter's probabilities as the unary, so it needs ``pydensecrf``
only when it is asked for.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from pipeline.config import CRFConfig
from pipeline.data import IGNORE, SegDataset, read_image, read_mask
from pipeline.data.dataset import IMAGE_EXTENSIONS
from pipeline.data.transforms import segmenter_eval_transform, to_chw
from pipeline.device import autocast
from pipeline.errors import ConfigError, UserError
from pipeline.maps import chunks
from pipeline.metrics import ConfusionMatrix
from pipeline.models.fold import inference_copy
from pipeline.refine.crf import crf_posterior
from pipeline.runfolder import atomic_write_bytes, save_label_png, voc_palette, write_json


def checked_scales(scales: list[float]) -> tuple[float, ...]:
    """``segmenter.test_scales``, checked: at least one factor, each above 0."""
    if not scales or any(not scale > 0 for scale in scales):
        raise ConfigError(f"config key 'segmenter.test_scales': expected a list of factors above 0, got {scales}")
    return tuple(scales)


class Predictor:
    """A trained segmenter with its checkpoint's preprocessing: ``probs(image)`` and ``labels(image)``."""

    def __init__(self, net: nn.Module, ckpt: dict[str, Any], device: torch.device, flip: bool = True,
                 crf: CRFConfig | None = None, scales: tuple[float, ...] = (1.0,)):
        # channels_last, as in training, with BatchNorm folded into the convolutions (an inference copy, checked
        # on a probe input): faster on CPU, the same labels (docs/experiments.md#option-decisions-issue-28)
        probe = torch.zeros(1, 3, ckpt["input_size"], ckpt["input_size"], device=device)
        self.net = inference_copy(net.eval(), probe)
        self.device, self.flip, self.crf = device, flip, crf
        self.scales = tuple(scales)
        self.transform = segmenter_eval_transform(ckpt["input_size"], ckpt["mean"], ckpt["std"])
        self.num_labels = len(ckpt["classes"]) + int(ckpt["background"])

    def probs(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> label probabilities [L,H,W] float32 at the image's size, averaged over the
        scales (and the mirror image with ``flip``)."""
        return self.probs_batch([image])[0]

    @torch.no_grad()
    def probs_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """``probs`` of several images; those that the transform brings to the same size go through the
        network together (in eval mode an image's output does not depend on its batch)."""
        inputs = [to_chw(self.transform(image=image)["image"]) for image in images]
        total: list[torch.Tensor | None] = [None] * len(images)
        for shape in dict.fromkeys(x.shape for x in inputs):
            index = [i for i, x in enumerate(inputs) if x.shape == shape]
            x = torch.stack([inputs[i] for i in index]).to(self.device, memory_format=torch.channels_last)
            for scale in self.scales:
                xs = x if scale == 1 else F.interpolate(
                    x, size=[max(1, round(n * scale)) for n in x.shape[-2:]], mode="bilinear", align_corners=False)
                with autocast(self.device):
                    logits = self.net(torch.cat([xs, xs.flip(-1)]) if self.flip else xs).float()
                p = logits.softmax(1)
                p = (p[:len(index)] + p[len(index):].flip(-1)) / 2 if self.flip else p
                for row, i in enumerate(index):
                    p_i = F.interpolate(p[row:row + 1], size=images[i].shape[:2], mode="bilinear",
                                        align_corners=False)[0]
                    total[i] = p_i if total[i] is None else total[i] + p_i
        return [(t / len(self.scales)).cpu().numpy() for t in total]

    def labels(self, image: np.ndarray, probs: np.ndarray | None = None, crf: bool | None = None) -> np.ndarray:
        """uint8 labels [H,W] in the label index space; with the CRF when ``crf`` (default: if configured)."""
        probs = self.probs(image) if probs is None else probs
        if (self.crf is not None) if crf is None else crf:
            probs = crf_posterior(probs, image, self.crf or CRFConfig())
        return probs.argmax(0).astype(np.uint8)


def score_segmenter(predictor: Predictor, ds: SegDataset, desc: str = "val",
                    batch: int = 16) -> dict[str, ConfusionMatrix]:
    """Confusion matrices on the images of ``ds`` that have GT masks: ``raw``, and ``crf`` if it is configured.
    ``batch`` images at a time go through ``Predictor.probs_batch``."""
    confs = {"raw": ConfusionMatrix(predictor.num_labels)}
    if predictor.crf is not None:
        confs["crf"] = ConfusionMatrix(predictor.num_labels)
    samples = [s for s in ds.samples if s.mask_path]
    with tqdm(total=len(samples), desc=desc, leave=False) as bar:
        for part in chunks(len(samples), batch):
            images = [read_image(s.image_path) for s in samples[part]]
            for s, image, probs in zip(samples[part], images, predictor.probs_batch(images), strict=True):
                gt = read_mask(s.mask_path, image.shape[:2])
                confs["raw"].update(gt, predictor.labels(image, probs, crf=False))
                if "crf" in confs:
                    confs["crf"].update(gt, predictor.labels(image, probs, crf=True))
                bar.update()
    return confs


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with each label's VOC colour blended in (255 = ignore: left as it is)."""
    palette = np.asarray(voc_palette(), dtype=np.float32).reshape(-1, 3)
    colour = palette[labels]
    out = image.astype(np.float32)
    keep = labels != IGNORE
    out[keep] = (1 - alpha) * out[keep] + alpha * colour[keep]
    return out.round().astype(np.uint8)


def image_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: images folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{folder}: no images in it (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def predict_folder(predictor: Predictor, label_names: list[str], images: Path, out: Path) -> int:
    """Write ``out/masks/<stem>.png`` (palette PNG, label index space) and ``out/overlays/<stem>.jpg`` for every
    image of ``images``, and ``out/legend.json`` (label index -> name and colour). Returns the image count."""
    files = image_files(images)
    palette = np.asarray(voc_palette()).reshape(-1, 3)
    write_json(Path(out) / "legend.json", {str(k): {"name": n, "rgb": palette[k].tolist()}
                                           for k, n in enumerate(label_names)})
    for path in tqdm(files, desc="predict", leave=False):
        image = read_image(path)
        labels = predictor.labels(image)
        save_label_png(Path(out) / "masks" / f"{path.stem}.png", labels)
        buf = io.BytesIO()
        Image.fromarray(overlay(image, labels)).save(buf, format="JPEG", quality=90)
        atomic_write_bytes(Path(out) / "overlays" / f"{path.stem}.jpg", buf.getvalue())
    return len(files)
