"""Refinement speed: images/s of every registered refiner with 1 and 2 (or N) worker processes.

Self-contained: coarse class maps are made from MSRC-21 ground truth (one-hot masks pooled to stride
16, blurred and upsampled, as a CAM looks), so no earlier run is needed. Writes bench/refine.json.
The ``sam`` refiner runs without its embedding cache, so its figure includes the image encoder and its
graphcut fallback.

    .venv/bin/python -m bench.bench_refine [--images 120] [--workers 1 2] [--refiners crf graphcut]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import DataConfig, RefineConfig
from pipeline.data import load_dataset, read_mask
from pipeline.data.dataset import SegDataset
from pipeline.maps.io import save_maps
from pipeline.refine import REFINERS
from pipeline.refine.runner import refine_split

MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"
log = logging.getLogger("bench")


def coarse_maps(ds: SegDataset, out: Path) -> None:
    for s in ds.samples:
        gt = read_mask(s.mask_path)
        h, w = gt.shape
        maps = []
        for c in s.labels:
            small = cv2.resize((gt == ds.label_of(c)).astype(np.float32), (max(1, w // 16), max(1, h // 16)),
                               interpolation=cv2.INTER_AREA)
            m = cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), (0, 0), 6)
            maps.append(m / max(m.max(), 1e-6))
        save_maps(out / f"{s.id}.npz", np.stack(maps), list(s.labels), ds.classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--refiners", nargs="+", default=list(REFINERS), choices=list(REFINERS))
    parser.add_argument("--out", default="bench/refine.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ds = load_dataset(DataConfig(kind="voc", root=str(MSRC), background=False), "train")
    ds.samples = ds.samples[: args.images]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        maps_dir = Path(tmp) / "maps"
        coarse_maps(ds, maps_dir)
        for name in args.refiners:
            results[name] = {}
            outputs = {}
            for workers in args.workers:
                out = Path(tmp) / f"{name}_{workers}"
                t0 = time.perf_counter()
                refine_split(name, ds, maps_dir, out, RefineConfig(workers=str(workers)))
                dt = time.perf_counter() - t0
                outputs[workers] = [(out / f"{s.id}.png").read_bytes() for s in ds.samples]
                results[name][f"ips_{workers}w"] = round(len(ds) / dt, 2)
            base = results[name][f"ips_{args.workers[0]}w"]
            for workers in args.workers[1:]:
                results[name][f"speedup_{workers}w"] = round(results[name][f"ips_{workers}w"] / base, 2)
                results[name][f"identical_{workers}w"] = outputs[workers] == outputs[args.workers[0]]
    Path(args.out).write_text(json.dumps({"images": len(ds), "refiners": results}, indent=2) + "\n")
    for name, r in results.items():
        log.info("%-10s %s", name, "  ".join(f"{k} {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
