"""Export cost: seconds per image and size on disk of each export format (pipeline/export.py, pipeline/formats/).

On a finished run, the refined label set it exports (``--run runs/msrc21 --refiner sam_rw``); without ``--run``,
the MSRC-21 train ground-truth masks stand in for pseudo-masks (same images, same sizes, void pixels as the ignore
value). The VOC export is timed first (it is what every other format is written from), then each format alone.
Images are copied (``--images copy``, the default) so that the sizes count real bytes; ``link`` times the default
of a run. Writes bench/export.json and prints a markdown table.

    .venv/bin/python -m bench.bench_export [--run runs/msrc21 --refiner sam_rw] [--limit 100] [--formats coco hf]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from pipeline.config import DataConfig, load_config
from pipeline.data import load_dataset
from pipeline.data.dataset import spread
from pipeline.export import export_pseudo_masks, write_formats
from pipeline.formats import FORMATS, VOC

MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"
log = logging.getLogger("bench")


def disk_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of every regular file under ``folder``, bytes of those that are not images): a link counts 0."""
    total = labels = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            size = p.stat().st_size
            total += size
            labels += 0 if p.suffix == ".jpg" else size
    return total, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished run folder (default: MSRC-21 GT masks as stand-in label maps)")
    parser.add_argument("--refiner", default="sam_rw", help="with --run: the refined label set")
    parser.add_argument("--limit", type=int, default=None, help="only this many images, spread over the split")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--images", default="copy", choices=["copy", "link"])
    parser.add_argument("--out", default="bench/export.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.run:
        cfg = load_config(Path(args.run) / "config.yaml")
        ds = load_dataset(cfg.data, cfg.maps.split)
        labels_dir, source = Path(args.run) / "refined" / args.refiner, f"{args.run} refined/{args.refiner}"
        ds.samples = [s for s in ds.samples if (labels_dir / f"{s.id}.png").exists()]
    else:
        ds = load_dataset(DataConfig(kind="voc", root=str(MSRC), background=False), "train")
        labels_dir, source = MSRC / "SegmentationClass", "MSRC-21 train GT masks (stand-in)"
    ds.samples = spread(ds.samples, args.limit)
    n = len(ds.samples)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        voc = Path(tmp) / "pseudo_masks"
        t0 = time.perf_counter()
        export_pseudo_masks(ds, labels_dir, voc, args.images)
        results[VOC] = {"seconds": time.perf_counter() - t0}
        results[VOC]["bytes"], results[VOC]["bytes_without_images"] = disk_bytes(voc)
        for name in args.formats:
            t0 = time.perf_counter()
            write_formats(voc, Path(tmp) / "exports", [name], args.images)
            results[name] = {"seconds": time.perf_counter() - t0}
            results[name]["bytes"], results[name]["bytes_without_images"] = disk_bytes(Path(tmp) / "exports" / name)
    for r in results.values():
        r["ms_per_image"] = round(1000 * r["seconds"] / n, 2)
        r["seconds"] = round(r["seconds"], 2)
    report = {"source": source, "images": n, "images_mode": args.images, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n{source}: {n} images, images {args.images}\n")
    print("| format | seconds | ms / image | size on disk (MB) | without the images (MB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| `{name}` | {r['seconds']:.1f} | {r['ms_per_image']:.1f} | {r['bytes'] / 1e6:.1f} | "
              f"{r['bytes_without_images'] / 1e6:.2f} |")


if __name__ == "__main__":
    main()
