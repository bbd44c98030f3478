"""Training of the segmenter on label masks (pseudo-masks or GT): pixel cross-entropy that ignores 255,
validation mIoU against GT after every epoch, in the loop the classifier uses (``pipeline.train.fit``:
AdamW with warm-up + cosine, AMP on CUDA, resumable per epoch, data-parallel under torchrun).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.config import SegmenterConfig
from pipeline.data import IGNORE, Sample, SegDataset, read_image, read_mask
from pipeline.data.transforms import segmenter_train_transform, to_chw
from pipeline.distributed import DistContext
from pipeline.errors import ConfigError, DataError
from pipeline.segmenter.predict import Predictor, score_segmenter
from pipeline.train import LossNet, fit


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel cross-entropy over the pixels whose label is not 255: an ignored pixel adds neither loss
    nor gradient. A batch with no labelled pixel gives 0 (not NaN)."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp_min(1)


class MaskedImages(Dataset):
    """Decoded images and label masks (kept in memory), augmented jointly.

    Item ``i`` of epoch ``e`` (:meth:`set_epoch`) is augmented with a seed made of (``seed``, ``e``, ``i``) only,
    so an augmentation does not depend on which loader worker or process draws it."""

    def __init__(self, samples: list[Sample], transform, seed: int = 0, progress: bool = True):
        self.images, self.masks = [], []
        for s in tqdm(samples, desc="decode", leave=False, disable=not progress):
            image = read_image(s.image_path)
            self.images.append(image)
            self.masks.append(read_mask(s.mask_path, image.shape[:2]))
        self.transform = transform
        self.seed, self.epoch_seed = seed, seed * 1000

    def set_epoch(self, epoch: int) -> None:
        self.epoch_seed = self.seed * 1000 + epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        self.transform.set_random_seed((self.epoch_seed * 1_000_003 + i) % 2**31)
        out = self.transform(image=self.images[i], mask=self.masks[i])
        return to_chw(out["image"]), torch.from_numpy(out["mask"].astype(np.int64))


def labelled_samples(ds: SegDataset, what: str) -> list[Sample]:
    """The samples of ``ds``, each of which must have a mask (``what`` names them in the error)."""
    missing = [s for s in ds.samples if not s.mask_path]
    if missing:
        raise ConfigError(f"{ds.root}: image {missing[0].id!r} has no mask, but the segmenter trains on {what}")
    return list(ds.samples)


def segmenter_losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The segmenter's training loss (``pipeline.train.LossNet`` wraps it for the training loop)."""
    return {"ce": segmentation_loss(net(x), y)}


def labelled_pixels(x: torch.Tensor, y: torch.Tensor) -> int:
    """What the loss averages over: the batch's pixels not labelled 255 (at least 1)."""
    return max(1, int((y != IGNORE).sum()))


def train_segmenter(net: nn.Module, backbone_params: list[nn.Parameter], ckpt_info: dict[str, Any],
                    cfg: SegmenterConfig, train_samples: list[Sample], val_ds: SegDataset | None,
                    device: torch.device, seed: int, resume_path: Path, fingerprint: str,
                    name: str = "segmenter", ctx: DistContext | None = None) -> list[dict[str, Any]]:
    """Train ``net`` in place; returns the per-epoch history (loss, val mIoU when ``val_ds`` has GT masks).

    ``ckpt_info`` carries the preprocessing that prediction uses (input_size, mean, std, classes, background).
    Under torchrun ``ctx`` shares each batch among the processes and shards the validation images."""
    ctx = ctx or DistContext(device=device)
    ctx.local_batch_size(cfg.batch_size, "segmenter.batch_size")
    mean, std = ckpt_info["mean"], ckpt_info["std"]
    train = MaskedImages(train_samples, segmenter_train_transform(cfg.input_size, cfg.crop_size,
                                                                  tuple(cfg.scale_range), mean, std), seed,
                         progress=ctx.is_main)
    if len(train) < 2:
        where = train_samples[0].mask_path.parent if train_samples else "segmenter"
        raise DataError(f"{where}: {len(train)} training image(s) for the segmenter; it needs 2 or more "
                        "(its BatchNorm layers need batches of 2 or more)")
    val = None
    if val_ds is not None and any(s.mask_path for s in val_ds.samples):
        val = copy.copy(val_ds)
        val.samples = [val_ds.samples[i] for i in ctx.shard(len(val_ds.samples))]  # this process's share

    def validate() -> dict[str, float]:
        if val is None:
            return {}
        conf = score_segmenter(Predictor(net, ckpt_info, ctx.device, flip=cfg.flip_test), val,
                               desc=f"{name} val")["raw"]
        conf.mat = ctx.all_reduce_sum(torch.from_numpy(conf.mat)).numpy()
        return {"val_miou": round(conf.miou(), 4)}

    return fit(LossNet(net, segmenter_losses), net, backbone_params, cfg, "segmenter", train, validate, seed,
               resume_path, fingerprint, ctx, count=labelled_pixels, name=name)
