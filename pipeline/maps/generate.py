"""Produce every configured map method for every image of a split, in one pass over the data.

``maps.executor: ray`` computes the per-image maps on a pool of Ray actors (``pipeline/executors.py``),
each holding the classifier once; they send the maps back and this process writes them with the same
function as a local run, so the files are the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import MapsConfig, RayConfig
from pipeline.data import Sample, SegDataset, read_image
from pipeline.device import resolve_device
from pipeline.executors import ray_actors
from pipeline.maps import configured_method
from pipeline.maps.inference import multiscale_maps, to_tensor
from pipeline.maps.io import save_maps
from pipeline.models import load_classifier
from pipeline.models.fold import inference_copy


@dataclass(frozen=True)
class MapJob:
    """One image and the methods still to map on it."""

    sample: Sample
    methods: tuple[str, ...]


def map_jobs(ds: SegDataset, cfg: MapsConfig, out_root: Path, skip_existing: bool, suffix: str = "") -> list[MapJob]:
    """The images of ``ds`` with the methods whose map file is missing (all of them, unless
    ``skip_existing``); images with nothing left to do are left out."""
    jobs = []
    for s in ds.samples:
        todo = tuple(m for m in cfg.methods
                     if not (skip_existing and (out_root / (m + suffix) / f"{s.id}.npz").exists()))
        if todo:
            jobs.append(MapJob(s, todo))
    return jobs


def method_functions(cfg: MapsConfig) -> dict[str, Callable]:
    """Each method of ``cfg`` with its options bound."""
    return {m: configured_method(m, getattr(cfg, m, None)) for m in cfg.methods}


def image_maps(net: nn.Module, ckpt: dict[str, Any], fns: dict[str, Callable], job: MapJob, cfg: MapsConfig,
               num_classes: int, device: torch.device) -> Iterator[tuple[str, np.ndarray]]:
    """(method, float16 maps [K,H,W] of the image's K classes) for each method of ``job``, one at a time.

    The methods run on the classifier's inference copy (``pipeline.models.fold``: BatchNorm folded into the
    convolutions, channels_last; made once while the classifier is unchanged), which is faster on CPU than the
    training network; docs/experiments.md has the timings."""
    s = job.sample
    x = to_tensor(read_image(s.image_path), ckpt["mean"], ckpt["std"], device)
    present = torch.zeros((1, num_classes), dtype=torch.bool, device=device)
    present[0, list(s.labels)] = True
    model = inference_copy(net, x, fold=cfg.fold_batchnorm)
    for m in job.methods:
        maps = multiscale_maps(fns[m], model, x, present, cfg.scales, cfg.flip)[list(s.labels)]
        yield m, maps.cpu().numpy().astype(np.float16)


def map_worker(ckpt_path: str, cfg: MapsConfig, num_classes: int, device_name: str,
               threads: int) -> Callable[[MapJob], list[tuple[str, np.ndarray]]]:
    """The per-image function of a Ray actor of ``maps.executor: ray``: the classifier loaded once, on the
    actor's own device (``device_name`` resolved there), with ``threads`` torch threads."""
    torch.set_num_threads(max(1, threads))
    device = resolve_device(device_name)
    net, ckpt = load_classifier(Path(ckpt_path), device)
    fns = method_functions(cfg)
    return lambda job: list(image_maps(net, ckpt, fns, job, cfg, num_classes, device))


def generate_maps(net: nn.Module, ckpt: dict[str, Any], ds: SegDataset, cfg: MapsConfig, out_root: Path,
                  device: torch.device, skip_existing: bool = False, ray: RayConfig | None = None,
                  ckpt_path: Path | None = None, device_name: str = "auto", suffix: str = "") -> int:
    """Write ``out_root/<method><suffix>/<id>.npz`` for each method and image; returns the images processed now.
    With ``cfg.executor == "ray"`` the maps are computed by Ray actors that load ``ckpt_path`` on
    ``device_name`` (resolved where each actor runs), as ``ray`` says."""
    jobs = map_jobs(ds, cfg, out_root, skip_existing, suffix)
    if cfg.executor == "ray":
        if ckpt_path is None:
            raise ValueError("maps.executor ray needs the checkpoint's path")
        rc = ray or RayConfig()
        bar = tqdm(total=len(jobs), desc="maps (ray)")
        args = (str(ckpt_path), cfg, ds.num_classes, device_name, rc.cpus_per_actor)
        for job, results in ray_actors(map_worker, args, jobs, rc, "maps.executor", device_name):
            _save(out_root, job, results, ds.classes, suffix)
            bar.update()
        bar.close()
        return len(jobs)
    return _per_image_maps(net, ckpt, ds, cfg, out_root, device, jobs, suffix)


def _save(out_root: Path, job: MapJob, results: list[tuple[str, np.ndarray]], class_names: list[str],
          suffix: str = "") -> None:
    for m, maps in results:
        save_maps(out_root / (m + suffix) / f"{job.sample.id}.npz", maps, list(job.sample.labels), class_names)


def _per_image_maps(net: nn.Module, ckpt: dict[str, Any], ds: SegDataset, cfg: MapsConfig, out_root: Path,
                    device: torch.device, jobs: list[MapJob], suffix: str) -> int:
    fns = method_functions(cfg)
    for job in tqdm(jobs, desc="maps"):
        for m, maps in image_maps(net, ckpt, fns, job, cfg, ds.num_classes, device):
            _save(out_root, job, [(m, maps)], ds.classes, suffix)
    return len(jobs)
