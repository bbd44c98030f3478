"""Training of the classifier on image-level labels: multi-label BCE, AdamW with a cosine schedule.

The loss is the classifier's ``training_losses(x, targets) -> {name: loss}`` (``pipeline.models.Classifier``:
the multi-label BCE, or for ACoL the BCE of branch A and of branch B): their sum is trained, each logged per
epoch as ``loss_<name>`` when there are several.

Resumable: the state after each epoch goes to a resume file; a rerun with the same fingerprint
continues from the last finished epoch and gives the same weights as an uninterrupted run.

Data-parallel under torchrun (``pipeline/distributed.py``): ``classifier.batch_size`` is the global batch,
shared equally by the processes; the epoch's order of the samples and each sample's augmentation depend
on the seed, the epoch and the sample only, so N processes train the single-process model up to float
error. Only rank 0 writes the resume file; validation is sharded over the ranks and gathered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pipeline.config import ClassifierConfig
from pipeline.data import SegDataset, read_image
from pipeline.data.transforms import classifier_eval_transform, classifier_train_transform, to_chw
from pipeline.device import autocast
from pipeline.distributed import DistContext, sample_seed
from pipeline.errors import ConfigError, first_line
from pipeline.metrics import mean_average_precision
from pipeline.models import Classifier
from pipeline.runfolder import save_torch

log = logging.getLogger(__name__)
FUSED_ADAMW = ("cpu", "cuda")  # devices with a fused AdamW kernel


class LabelledImages(Dataset):
    """Decoded images (kept in memory) with their multi-hot label vectors.

    With a ``seed``, sample ``i`` of epoch ``e`` (:meth:`set_epoch`) is augmented with the random state
    ``sample_seed(seed, e, i)``: the same whichever process or loader worker draws it."""

    def __init__(self, ds: SegDataset, transform, seed: int | None = None, progress: bool = True):
        self.images = [read_image(s.image_path)
                       for s in tqdm(ds.samples, desc="decode", leave=False, disable=not progress)]
        self.targets = np.stack([ds.labels_vector(s) for s in ds.samples])
        self.transform = transform
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.seed is not None:
            self.transform.set_random_seed(sample_seed(self.seed, self.epoch, i))
        return to_chw(self.transform(image=self.images[i])["image"]), torch.from_numpy(self.targets[i])


@torch.no_grad()
def predict_scores(net: nn.Module, data: Dataset, device: torch.device, batch_size: int) -> np.ndarray:
    net.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    for x, _ in loader:
        with autocast(device):
            out.append(torch.sigmoid(net(x.to(device)).float()).cpu())
    return torch.cat(out).numpy()


def training_losses(net: Classifier, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The classifier's losses (``Classifier.training_losses``)."""
    return net.training_losses(x, y)


Losses = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class LossNet(nn.Module):
    """``forward(x, y)`` = ``losses(net, x, y)``, the training losses of ``net`` (the classifier's by default):
    what DDP wraps, so that its forward (the one that prepares the gradient all-reduce) computes the losses."""

    def __init__(self, net: nn.Module, losses: Losses = training_losses):
        super().__init__()
        self.net, self.losses = net, losses

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.losses(self.net, x, y)


def _resume_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The state saved after the last finished epoch of a run with this fingerprint, if there is one."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file: start afresh rather than fail
        log.warning("%s: unreadable (%s); training starts from epoch 1", path, first_line(exc))
        return None
    return state if isinstance(state, dict) and state.get("fingerprint") == fingerprint else None


def train_classifier(net: Classifier, backbone_params: list[nn.Parameter], cfg: ClassifierConfig,
                     train_ds: SegDataset, val_ds: SegDataset | None, mean, std, device: torch.device,
                     seed: int, resume_path: Path, fingerprint: str,
                     ctx: DistContext | None = None, train: Dataset | None = None) -> list[dict[str, Any]]:
    """Train ``net`` in place; returns the per-epoch history (loss, val mAP). Under torchrun, ``ctx`` is the
    process's :class:`DistContext` (``device`` is then ``ctx.device``); without one, a single process.
    ``train``: the training items, when not ``train_ds``'s augmented images (the decoupled round's)."""
    ctx = ctx or DistContext(device=device)
    ctx.local_batch_size(cfg.batch_size, "classifier.batch_size")  # N must divide the batch: fail early
    train = train or LabelledImages(train_ds, classifier_train_transform(cfg.input_size, mean, std), seed=seed,
                                    progress=ctx.is_main)
    val = (LabelledImages(val_ds, classifier_eval_transform(cfg.input_size, mean, std), progress=ctx.is_main)
           if val_ds else None)

    def validate() -> dict[str, float]:
        if val is None:
            return {}
        local = predict_scores(net, Subset(val, ctx.shard(len(val))), ctx.device, cfg.batch_size)
        scores = ctx.gather_rows(torch.from_numpy(local), len(val)).numpy()
        return {"val_map": mean_average_precision(scores, val.targets)}

    return fit(LossNet(net), net, backbone_params, cfg, "classifier", train, validate, seed, resume_path,
               fingerprint, ctx)


def fit(loss_net: nn.Module, net: nn.Module, backbone_params: list[nn.Parameter], cfg: Any, section: str,
        train: Dataset, validate: Callable[[], dict[str, float]], seed: int, resume_path: Path, fingerprint: str,
        ctx: DistContext, count: Callable[[torch.Tensor, torch.Tensor], int] = lambda x, y: len(x),
        name: str | None = None) -> list[dict[str, Any]]:
    """The training loop that the classifier and the segmenter share; trains ``net`` in place, returns the
    per-epoch history (``loss``, ``loss_<part>`` when there are several, and what ``validate()`` returns).

    ``loss_net(x, y)`` gives ``net``'s losses ``{part: mean}`` over the ``count(x, y)`` items of the batch
    (images; labelled pixels for the segmenter), so that under DDP the means and gradients are those of the
    global batch. ``cfg`` is the config ``section`` (``epochs``, ``batch_size``, ``lr``, ``backbone_lr_mult``,
    ``weight_decay``, ``workers``): AdamW with the backbone at ``lr * backbone_lr_mult``, a linear warm-up
    over the first epoch (at most a tenth of the steps) then cosine decay. The AdamW is fused on CPU and CUDA
    (one kernel for all parameters, the same updates up to float error). ``net`` and the image batches are in
    channels_last memory format (faster convolutions on CPU; docs/experiments.md). After every epoch rank 0
    saves the resume state; a rerun with the same ``fingerprint`` continues from there.
    Parameters that need no gradient (frozen stages) stay out of the optimiser."""
    name = name or section
    device = ctx.device
    net.to(device, memory_format=torch.channels_last)
    backbone_ids = {id(p) for p in backbone_params}
    head_params = [p for p in net.parameters() if id(p) not in backbone_ids and p.requires_grad]
    backbone_params = [p for p in backbone_params if p.requires_grad]  # frozen ones stay out of the optimiser
    opt = torch.optim.AdamW([
        {"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_mult},
        {"params": head_params, "lr": cfg.lr},
    ], weight_decay=cfg.weight_decay, fused=device.type in FUSED_ADAMW)
    drop_last = len(train) > cfg.batch_size
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(steps_per_epoch, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * s / total)))

    history: list[dict[str, Any]] = []
    start = 0
    state = _resume_state(resume_path, fingerprint)
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"]
        log.info("resuming %s training after epoch %d", name, start)
    model = ctx.wrap(loss_net)  # DDP over the losses with more than one process, else loss_net itself

    for epoch in range(start, cfg.epochs):
        torch.manual_seed(seed * 1000 + epoch)
        loader = ctx.loader(train, cfg.batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=drop_last,
                            key=f"{section}.batch_size", num_workers=cfg.workers, persistent_workers=False)
        model.train()
        losses: dict[str, list[float]] = {}
        bar = tqdm(loader, desc=f"{name} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not ctx.is_main)
        for x, y in bar:
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device):
                parts = model(x, y)
            loss = sum(parts.values())
            means, scale = ctx.reduce_losses({"loss": loss, **parts}, count(x, y))  # the global batch's means
            if not math.isfinite(means["loss"]):
                raise ConfigError(f"config key '{section}.lr': training diverged (loss {means['loss']} in epoch "
                                  f"{epoch + 1}); lower {section}.lr (now {cfg.lr}) and rerun train_{section}")
            opt.zero_grad(set_to_none=True)
            (loss if scale == 1.0 else loss * scale).backward()
            opt.step()
            sched.step()
            for key, value in means.items():
                losses.setdefault(key, []).append(value)
            bar.set_postfix(loss=f"{losses['loss'][-1]:.3f}")
        entry: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses["loss"]))}
        if len(parts) > 1:
            entry.update({f"loss_{part}": float(np.mean(losses[part])) for part in parts})
        entry.update(validate())
        history.append(entry)
        scores = "  ".join(f"{k} {v:.3f}" for k, v in entry.items() if k.startswith("val_"))
        log.info("%s epoch %d/%d  loss %.4f  %s", name, epoch + 1, cfg.epochs, entry["loss"], scores or "no val")
        if ctx.is_main:
            save_torch(resume_path, {"fingerprint": fingerprint, "epoch": epoch + 1, "history": history,
                                     "model": net.state_dict(), "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict()})
    return history
