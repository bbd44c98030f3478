"""Run a refiner over every image of a split in a process pool, or on Ray (``refine.executor: ray``:
CPU tasks over shards of images, ``pipeline/executors.py``); outputs do not depend on either.

Ray tasks send the label maps back and this process writes them with the same function as the pool's
workers, so the files are the same bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config import RayConfig, RefineConfig
from pipeline.data import SegDataset, read_image
from pipeline.errors import DataError
from pipeline.executors import ray_tasks
from pipeline.maps.io import load_maps
from pipeline.refine import get_refiner
from pipeline.runfolder import save_label_png
from pipeline.saliency import Prior
from pipeline.workers import run_pool


def resolve_workers(workers: str) -> int:
    """``refine.workers`` as a number (checked by ``pipeline.config.validate``): ``auto`` = the usable cores."""
    if workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(workers)


@dataclass(frozen=True)
class _Job:
    refiner: str
    map_path: Path
    image_path: Path
    out_path: Path
    class_names: tuple[str, ...]
    background: bool
    cfg: RefineConfig
    cache: Path | None = None  # <run>/cache/<refiner>/<id>, for refiners registered with cache=True
    prior: Prior | None = None  # the run's salient-object prior (saliency.enabled), applied to the maps first


def refine_label(job: _Job) -> np.ndarray:
    """The label map of one image (uint8, checked to hold only the image's classes, background and 255)."""
    refiner = get_refiner(job.refiner)
    maps, classes = load_maps(job.map_path, list(job.class_names))
    if job.prior is not None:
        maps = job.prior.apply(maps, classes, job.map_path.stem)
    image = read_image(job.image_path) if refiner.needs_image else None
    try:
        extra = ({"cache": job.cache} if refiner.cache else {}) | (
            {"class_names": job.class_names} if refiner.names else {})
        label = refiner.fn(maps, classes, image, job.background, job.cfg, **extra)
    except DataError as exc:
        raise DataError(f"{job.map_path}: {exc}") from None
    allowed = set((classes + int(job.background)).tolist()) | {255} | ({0} if job.background else set())
    stray = set(np.unique(label).tolist()) - allowed
    if stray:  # a refiner bug, not a user error
        raise AssertionError(f"refiner {job.refiner} wrote labels {sorted(stray)} not among the image's classes")
    return label


def _run_one(job: _Job) -> str:
    save_label_png(job.out_path, refine_label(job))
    return job.out_path.stem


def refine_split(refiner: str, ds: SegDataset, maps_dir: Path, out_dir: Path, cfg: RefineConfig,
                 skip_existing: bool = False, ray: RayConfig | None = None, cache_dir: Path | None = None,
                 device: str = "auto", prior: Prior | None = None) -> int:
    """Refine every image of ``ds`` (on Ray as ``ray`` says when ``cfg.executor`` is ray); returns the
    number of images processed now. ``cache_dir``: the run's cache folder, for refiners that keep a per-image
    cache (``<cache_dir>/<refiner>/<id>``); ``device``: where such a refiner's ``prepare`` pass runs; ``prior``:
    the run's salient-object prior, which every image's maps go through before the refiner."""
    spec = get_refiner(refiner)  # fails early on a bad name
    base = spec.cache and cache_dir is not None
    jobs = [_Job(refiner, maps_dir / f"{s.id}.npz", s.image_path, out_dir / f"{s.id}.png", tuple(ds.classes),
                 ds.background, cfg, cache_dir / refiner / s.id if base else None, prior)
            for s in ds.samples]
    if skip_existing:
        jobs = [j for j in jobs if not j.out_path.exists()]
    if spec.prepare is not None and base and jobs:
        spec.prepare([j.image_path for j in jobs], [j.cache for j in jobs], cfg, device)
    workers = min(resolve_workers(cfg.workers), max(1, len(jobs)))
    bar = tqdm(total=len(jobs), desc=f"refine {refiner}", leave=False)
    if cfg.executor == "ray":
        for job, label in ray_tasks(refine_label, jobs, ray or RayConfig(), "refine.executor"):
            save_label_png(job.out_path, label)
            bar.update()
    elif workers == 1:
        for job in jobs:
            _run_one(job)
            bar.update()
    else:
        # small chunks: progress and the stall limit are per chunk, and a Ctrl-C drops only queued ones
        chunk = max(1, min(16, len(jobs) // (workers * 8)))
        for _ in run_pool(_run_one, jobs, workers, what=f"refine {refiner}", stall_s=cfg.stall_timeout,
                          chunk=chunk):
            bar.update()
    bar.close()
    return len(jobs)
