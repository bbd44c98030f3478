"""Produce every configured map method for every image of a split, in one pass over the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import MapsConfig
from pipeline.data import SegDataset, read_image
from pipeline.maps import configured_method
from pipeline.maps.inference import multiscale_maps, to_tensor
from pipeline.maps.io import save_maps


def generate_maps(net: nn.Module, ckpt: dict[str, Any], ds: SegDataset, cfg: MapsConfig, out_root: Path,
                  device: torch.device, skip_existing: bool = False) -> int:
    """Write ``out_root/<method>/<id>.npz`` for each method and image; returns the images processed now."""
    methods = cfg.methods
    fns = {m: configured_method(m, getattr(cfg, m, None)) for m in methods}
    done = 0
    for s in tqdm(ds.samples, desc="maps"):
        outs = {m: out_root / m / f"{s.id}.npz" for m in methods}
        todo = [m for m in methods if not (skip_existing and outs[m].exists())]
        if not todo:
            continue
        x = to_tensor(read_image(s.image_path), ckpt["mean"], ckpt["std"], device)
        present = torch.zeros((1, ds.num_classes), dtype=torch.bool, device=device)
        present[0, list(s.labels)] = True
        for m in todo:
            maps = multiscale_maps(fns[m], net, x, present, cfg.scales, cfg.flip)[list(s.labels)]
            save_maps(outs[m], maps.cpu().numpy(), list(s.labels), ds.classes)
        done += 1
    return done
