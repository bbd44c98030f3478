"""Training of the classifier on image-level labels: multi-label BCE, AdamW with a cosine schedule.

A model with a ``training_losses(x, targets) -> {name: loss}`` method (ACoL: BCE of branch A and of
branch B) is trained on the sum of its losses, each logged per epoch as ``loss_<name>``.

Resumable: the state after each epoch goes to a resume file; a rerun with the same fingerprint
continues from the last finished epoch and gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.config import ClassifierConfig
from pipeline.data import SegDataset, read_image
from pipeline.data.transforms import classifier_eval_transform, classifier_train_transform, to_chw
from pipeline.device import autocast
from pipeline.errors import ConfigError, first_line
from pipeline.metrics import mean_average_precision
from pipeline.runfolder import save_torch

log = logging.getLogger(__name__)


class LabelledImages(Dataset):
    """Decoded images (kept in memory) with their multi-hot label vectors."""

    def __init__(self, ds: SegDataset, transform):
        self.images = [read_image(s.image_path) for s in tqdm(ds.samples, desc="decode", leave=False)]
        self.targets = np.stack([ds.labels_vector(s) for s in ds.samples])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return to_chw(self.transform(image=self.images[i])["image"]), torch.from_numpy(self.targets[i])


def _set_aug_seed(dataset: LabelledImages, seed: int) -> None:
    dataset.transform.set_random_seed(seed)


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % 2**31 + worker_id)


@torch.no_grad()
def predict_scores(net: nn.Module, data: LabelledImages, device: torch.device, batch_size: int) -> np.ndarray:
    net.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    for x, _ in loader:
        with autocast(device):
            out.append(torch.sigmoid(net(x.to(device)).float()).cpu())
    return torch.cat(out).numpy()


def training_losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's own ``training_losses`` if it has them, else the multi-label BCE of its scores."""
    if hasattr(net, "training_losses"):
        return net.training_losses(x, y)
    return {"bce": F.binary_cross_entropy_with_logits(net(x).float(), y)}


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


def train_classifier(net: nn.Module, backbone_params: list[nn.Parameter], cfg: ClassifierConfig,
                     train_ds: SegDataset, val_ds: SegDataset | None, mean, std, device: torch.device,
                     seed: int, resume_path: Path, fingerprint: str) -> list[dict[str, Any]]:
    """Train ``net`` in place; returns the per-epoch history (loss, val mAP)."""
    train = LabelledImages(train_ds, classifier_train_transform(cfg.input_size, mean, std))
    val = LabelledImages(val_ds, classifier_eval_transform(cfg.input_size, mean, std)) if val_ds else None
    net.to(device)
    backbone_ids = {id(p) for p in backbone_params}
    head_params = [p for p in net.parameters() if id(p) not in backbone_ids]
    opt = torch.optim.AdamW([
        {"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_mult},
        {"params": head_params, "lr": cfg.lr},
    ], weight_decay=cfg.weight_decay)
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
        log.info("resuming classifier training after epoch %d", start)

    for epoch in range(start, cfg.epochs):
        torch.manual_seed(seed * 1000 + epoch)
        _set_aug_seed(train, seed * 1000 + epoch)
        loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train) > cfg.batch_size,
                            num_workers=cfg.workers, worker_init_fn=_worker_init if cfg.workers else None,
                            persistent_workers=False)
        net.train()
        losses: dict[str, list[float]] = {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device):
                parts = training_losses(net, x, y)
            loss = sum(parts.values())
            if not torch.isfinite(loss):
                raise ConfigError(f"config key 'classifier.lr': training diverged (loss {loss.item()} in epoch "
                                  f"{epoch + 1}); lower classifier.lr (now {cfg.lr}) and rerun train_classifier")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for name, value in {"loss": loss, **parts}.items():
                losses.setdefault(name, []).append(value.item())
            bar.set_postfix(loss=f"{losses['loss'][-1]:.3f}")
        entry: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses["loss"]))}
        if len(parts) > 1:
            entry.update({f"loss_{name}": float(np.mean(losses[name])) for name in parts})
        if val is not None:
            entry["val_map"] = mean_average_precision(predict_scores(net, val, device, cfg.batch_size), val.targets)
        history.append(entry)
        log.info("epoch %d/%d  loss %.4f  val mAP %s", epoch + 1, cfg.epochs, entry["loss"],
                 f"{entry['val_map']:.3f}" if "val_map" in entry else "n/a")
        save_torch(resume_path, {"fingerprint": fingerprint, "epoch": epoch + 1, "history": history,
                                 "model": net.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict()})
    return history
