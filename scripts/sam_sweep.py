"""Score the ``sam`` refiner's prompt settings on a finished run without re-encoding or re-running its fallback.

Reads the run's cached SAM embeddings (``<run>/cache/sam/``, filled by the refine stage), the maps of one method
and an already refined label set as the fallback, and prints the mIoU over all classes, the object classes and
the stuff classes (``refine.sam.stuff``) for each variant, plus the per-class IoU of the best one. A variant is a
list of ``key=value`` settings of ``refine.sam``, separated by semicolons; ``base`` is the config's own. E.g.

    .venv/bin/python scripts/sam_sweep.py --config configs/msrc21.yaml --maps cam_rw --fallback graphcut_rw \\
        base threshold=0.3 "box_margin=0.05;max_boxes=5"

The per-image work is the refiner's own (``pipeline.refine.sam.sam_labels``), so a variant's figure is what
``refine.refiners: [sam]`` with those settings writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import load_dataset, read_image, read_mask  # noqa: E402
from pipeline.maps.io import load_maps  # noqa: E402
from pipeline.metrics.segmentation import ConfusionMatrix  # noqa: E402
from pipeline.refine import sam as samr  # noqa: E402


def variant(cfg, spec: str):
    if spec == "base":
        return cfg.refine
    values = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in spec.split(";"))}
    return dataclasses.replace(cfg.refine, sam=dataclasses.replace(cfg.refine.sam, **values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--maps", default="cam_rw", help="map method whose maps prompt (maps/<method>/)")
    ap.add_argument("--fallback", default="graphcut_rw", help="refined label set used as the fallback")
    ap.add_argument("--limit", type=int, default=None, help="only this many images, spread over the split")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("variants", nargs="*", default=["base"])
    args = ap.parse_args()

    cfg = load_config(args.config)
    run = Path(cfg.run_dir)
    ds = load_dataset(cfg.data, cfg.maps.split)
    samples = ds.samples if args.limit is None else ds.samples[:: max(1, len(ds.samples) // args.limit)]
    model = samr.load_model(cfg.refine.sam, "cpu")
    names = ds.label_names
    stuff = {n.lower() for n in cfg.refine.sam.stuff}
    is_stuff = np.array([n.lower() in stuff for n in names])
    refines = [variant(cfg, v) for v in args.variants]
    cms = [ConfusionMatrix(ds.num_labels) for _ in refines] + [ConfusionMatrix(ds.num_labels)]
    for s in samples:
        image = read_image(s.image_path)
        gt = read_mask(s.mask_path, image.shape[:2])
        maps, classes = load_maps(run / "maps" / args.maps / f"{s.id}.npz", ds.classes)
        fallback = np.asarray(read_mask(run / "refined" / args.fallback / f"{s.id}.png", image.shape[:2]))
        emb = samr.embedding(image, model, run / "cache" / "sam" / s.id)
        for rc, cm in zip(refines, cms, strict=False):
            cm.update(gt, samr.sam_labels(maps, classes, image, ds.background, rc, fallback, model, emb, ds.classes))
        cms[-1].update(gt, fallback)

    out = {}
    for name, cm in zip([*args.variants, f"fallback {args.fallback}"], cms, strict=True):
        iou = cm.scores()["iou"]
        out[name] = {"miou": cm.miou(), "objects": float(np.nanmean(iou[~is_stuff])),
                     "stuff": float(np.nanmean(iou[is_stuff])) if is_stuff.any() else None,
                     "per_class": {n: None if np.isnan(v) else round(float(v), 4) for n, v in zip(names, iou,
                                                                                                strict=True)}}
        print(f"{name:50s} mIoU {out[name]['miou']:.4f}  objects {out[name]['objects']:.4f}  "
              f"stuff {out[name]['stuff'] if out[name]['stuff'] is None else round(out[name]['stuff'], 4)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
