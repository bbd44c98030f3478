"""Produce every configured map method: the per-image ones for every image of a split in one pass over
the data, then the run-once ones (``per_image = False``, e.g. ``class_model``) once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import MapsConfig
from pipeline.data import SegDataset, read_image
from pipeline.maps import configured_method, get_map_method
from pipeline.maps.inference import multiscale_maps, to_tensor
from pipeline.maps.io import save_maps


def is_per_image(name: str) -> bool:
    """Whether method ``name`` maps images (the default) rather than running once per run."""
    return getattr(get_map_method(name), "per_image", True)


def method_outputs(out_root: Path, name: str) -> list[Path]:
    """What a method writes under ``out_root``: the folder of its per-image maps, or for a run-once method
    ``<name>.png`` and ``<name>.json``, the json written last so that it marks the method done."""
    return [out_root / name] if is_per_image(name) else [out_root / f"{name}.png", out_root / f"{name}.json"]


def generate_maps(net: nn.Module, ckpt: dict[str, Any], ds: SegDataset, cfg: MapsConfig, out_root: Path,
                  device: torch.device, skip_existing: bool = False) -> int:
    """Write ``out_root/<method>/<id>.npz`` for each per-image method and image, and the outputs of each
    run-once method (called as ``method(net, ckpt, *method_outputs(...))``); returns the images processed now."""
    done = _per_image_maps(net, ckpt, ds, cfg, out_root, device, skip_existing)
    for m in cfg.methods:
        outs = method_outputs(out_root, m)
        if not is_per_image(m) and not (skip_existing and outs[-1].exists()):
            configured_method(m, getattr(cfg, m, None))(net, ckpt, *outs)
    return done


def _per_image_maps(net: nn.Module, ckpt: dict[str, Any], ds: SegDataset, cfg: MapsConfig, out_root: Path,
                    device: torch.device, skip_existing: bool) -> int:
    methods = [m for m in cfg.methods if is_per_image(m)]
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
