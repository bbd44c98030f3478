"""The README's picture: image | CAM | pseudo-mask | GT for a few images of a finished run folder.

    .venv/bin/python scripts/readme_figure.py runs/default docs/images/overview.jpg

Reads the run's ``config.yaml`` (the dataset: ``data.kind``, ``data.root``, ``data.background``, and
``maps.split``), ``maps/cam/<id>.npz`` and ``pseudo_masks/SegmentationClass/<id>.png``; the GT masks come from
the dataset. Each row shows one image, the CAM of one of its classes (the one with the smallest GT area, as the
report's sample grid picks it) over the image, the exported pseudo-mask and the GT mask, with the report's
colours (``pipeline/report/figures.py``). A relative ``data.root`` is taken from the current folder, or else
from the folder above ``runs/`` of the run.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.data import READERS, read_image, read_mask, spread  # noqa: E402
from pipeline.maps.io import load_maps  # noqa: E402
from pipeline.report import figures as fg  # noqa: E402

TITLES = ("image", "CAM", "pseudo-mask", "ground truth")
GAP, TITLE_H = 4, 22


def _data_root(run: Path, root: str, override: str | None) -> Path:
    if override:
        return Path(override)
    path = Path(root)
    if path.is_absolute() or path.exists():
        return path
    return run.resolve().parent.parent / path  # runs/<name> -> the project folder


def open_dataset(run: Path, data_root: str | None = None):
    """The dataset of the run's maps, as the run's config.yaml names it (read as plain YAML, so a config written
    by an older version of the code still opens)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    data, maps = cfg.get("data", {}), cfg.get("maps", {})
    kind = data.get("kind", "synthetic")
    reader = READERS[kind]
    kwargs = {}
    if "val_fraction" in inspect.signature(reader).parameters and "val_fraction" in data:
        kwargs["val_fraction"] = data["val_fraction"]
    root = _data_root(run, data.get("root", "datasets/synthetic"), data_root)
    return reader(root, maps.get("split", "train"), bool(data.get("background", True)), **kwargs)


def shown_class(ds, sample, gt: np.ndarray | None) -> int:
    """The class whose CAM a row shows: the labelled class with the smallest GT area (an object rather than
    stuff), or the first label without GT."""
    labels = list(sample.labels)
    if gt is None:
        return labels[0]
    areas = {c: int((gt == ds.label_of(c)).sum()) for c in labels}
    present = [c for c in labels if areas[c] > 0]
    return min(present, key=lambda c: areas[c]) if present else labels[0]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def row(ds, run: Path, sample, thumb: int) -> list[np.ndarray]:
    image = read_image(sample.image_path)
    h, w = image.shape[:2]
    scale = thumb / max(h, w)  # enlarged too: the synthetic images are 128 px
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = fg.resize(image, size)
    colours = fg.label_colours(ds.background)
    gt = read_mask(sample.mask_path) if sample.mask_path else None
    cls = shown_class(ds, sample, gt)
    maps, classes = load_maps(run / "maps" / "cam" / f"{sample.id}.npz", ds.classes)
    k = list(classes).index(cls) if cls in classes else None
    heat = fg.resize(maps[k], size) if k is not None else np.zeros(size[::-1], np.float32)
    pseudo = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{sample.id}.png")
    tiles = [small, fg.heat_overlay(small, heat),
             fg.label_overlay(small, fg.resize(pseudo, size, nearest=True), colours, ds.background)]
    if gt is not None:
        tiles.append(fg.label_overlay(small, fg.resize(gt, size, nearest=True), colours, ds.background))
    else:
        tiles.append(np.full_like(small, 255))
    return tiles


def compose(rows: list[list[np.ndarray]]) -> Image.Image:
    tile_w = max(t.shape[1] for r in rows for t in r)
    heights = [max(t.shape[0] for t in r) for r in rows]
    width = len(TITLES) * tile_w + (len(TITLES) + 1) * GAP
    height = TITLE_H + sum(heights) + (len(rows) + 1) * GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(15)
    for j, title in enumerate(TITLES):
        x0 = GAP + j * (tile_w + GAP)
        tw = draw.textlength(title, font=font)
        draw.text((x0 + (tile_w - tw) / 2, 3), title, fill=(30, 30, 30), font=font)
    y = TITLE_H + GAP
    for r, h in zip(rows, heights, strict=True):
        for j, tile in enumerate(r):
            x = GAP + j * (tile_w + GAP) + (tile_w - tile.shape[1]) // 2
            canvas.paste(Image.fromarray(tile), (x, y + (h - tile.shape[0]) // 2))
        y += h + GAP
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (runs/<name>)")
    parser.add_argument("out", type=Path, help="the JPEG to write, e.g. docs/images/overview.jpg")
    parser.add_argument("--images", type=int, default=3, help="rows (images spread over the run's maps)")
    parser.add_argument("--ids", nargs="*", help="these image ids instead")
    parser.add_argument("--thumb", type=int, default=192, help="longer side of a tile in pixels")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality")
    parser.add_argument("--data-root", help="the dataset folder, when config.yaml's data.root does not lead there")
    args = parser.parse_args(argv)
    run = args.run_dir
    ds = open_dataset(run, args.data_root)
    ready = [s for s in ds.samples if (run / "maps" / "cam" / f"{s.id}.npz").exists()
             and (run / "pseudo_masks" / "SegmentationClass" / f"{s.id}.png").exists()]
    if args.ids:
        by_id = {s.id: s for s in ready}
        chosen = [by_id[i] for i in args.ids if i in by_id]
    else:
        with_gt = [s for s in ready if s.mask_path]
        chosen = spread(with_gt or ready, args.images)
    if not chosen:
        print(f"error: {run}: no image has both maps/cam/<id>.npz and a pseudo-mask", file=sys.stderr)
        return 2
    picture = compose([row(ds, run, s, args.thumb) for s in chosen])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out, format="JPEG", quality=args.quality, optimize=True)
    print(f"wrote {args.out} ({picture.width}x{picture.height}, {args.out.stat().st_size / 1024:.0f} kB; "
          f"images {', '.join(s.id for s in chosen)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
