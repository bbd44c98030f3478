"""The report's pictures, made in memory: plots (PNG) and the sample tiles (JPEG): photos, map heat overlays,
label-map overlays. matplotlib is imported inside the functions that plot."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from pipeline.plots import faithfulness_curves_figure
from pipeline.report.html import data_uri
from pipeline.runfolder import voc_palette

IGNORE = 255


# ------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_uri(fig) -> str:
    """A matplotlib figure as a PNG data: URI (the figure is closed)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return data_uri(buf.getvalue(), "image/png")


def history_plot(history: list[dict[str, Any]], title: str) -> str | None:
    """Per-epoch losses (every key named loss*) on the left axis and the other scores (val mAP, val mIoU...)
    on the right, from a training log (a list of {"epoch": ..., ...})."""
    rows = [h for h in history if isinstance(h, dict) and "epoch" in h]
    if not rows:
        return None
    plt = _pyplot()
    keys = [k for k in rows[0] if k != "epoch" and isinstance(rows[0][k], int | float)]
    losses, scores = [k for k in keys if k.startswith("loss")], [k for k in keys if not k.startswith("loss")]
    epochs = [h["epoch"] for h in rows]
    fig, ax = plt.subplots(figsize=(5.2, 3.1))
    for i, k in enumerate(losses):
        ax.plot(epochs, [h.get(k) for h in rows], marker="o", ms=3, color=f"C{i}", label=k.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if scores:
        ax2 = ax.twinx()
        for i, k in enumerate(scores, start=len(losses)):
            ax2.plot(epochs, [h.get(k) for h in rows], marker="s", ms=3, color=f"C{i}", label=k.replace("_", " "))
        ax2.set_ylim(0, 1)
        ax2.set_ylabel(", ".join(k.replace("_", " ") for k in scores))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="center right")
    ax.set_title(title)
    return png_uri(fig)


def sweep_plot(maps: dict[str, dict[str, Any]]) -> str | None:
    """mIoU against the background threshold, one line per map method that has a sweep."""
    swept = {m: r for m, r in maps.items() if r.get("sweep")}
    if not swept:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.1))
    for m, r in swept.items():
        line, = ax.plot(r["sweep"]["threshold"], r["sweep"]["miou"], marker="o", ms=3,
                        label=f"{m} (best {r['miou']:.3f} at {r['threshold']:.2f})")
        ax.axvline(r["threshold"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU")
    ax.set_title("threshold sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_uri(fig)


def cooccurrence_plot(classes: list[str], conditional: list[list[float | None]]) -> str:
    """The heatmap of P(column | row): the share of the row class's training images that also hold the column
    class (label_stats.json); the shares of 50% and more are written in their cells."""
    plt = _pyplot()
    grid = np.array([[np.nan if v is None else v for v in row] for row in conditional], dtype=float)
    n = len(classes)
    side = min(11.0, 2.2 + 0.42 * n)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    for i in range(n):
        for j in range(n):
            if i != j and grid[i, j] >= 0.5:
                ax.text(j, i, f"{grid[i, j]:.0%}"[:-1], ha="center", va="center", fontsize=6,
                        color="black" if grid[i, j] > 0.7 else "white")
    ax.set_xlabel("b: also in the image (%)")
    ax.set_ylabel("a: class of the image")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="P(b | a)")
    ax.set_title("label co-occurrence, training split")
    return png_uri(fig)


def faithfulness_plot(results: dict[str, dict[str, Any]]) -> str | None:
    if not any(r.get("curves") for r in results.values()):
        return None
    return png_uri(faithfulness_curves_figure(results))


# ------------------------------------------------------------------------------------------------ tiles


def label_colours(background: bool) -> np.ndarray:
    """[256, 3] uint8: the colour of each label index. The VOC colours, shifted by one without a background
    class so that no class is black; 255 (ignore) white."""
    pal = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    colours = pal if background else np.concatenate([pal[1:], pal[:1]])
    colours = colours.copy()
    colours[IGNORE] = 255
    return colours


def jpeg_uri(arr: np.ndarray, quality: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, optimize=True)
    return data_uri(buf.getvalue(), "image/jpeg")


def image_uri(path, quality: int, max_side: int | None = None) -> str:
    """An image file (e.g. the class model grid) as a JPEG data: URI, RGB on white, at most ``max_side``."""
    with Image.open(path) as im:
        im = im.convert("RGBA")
        flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
        flat.alpha_composite(im)
        rgb = flat.convert("RGB")
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return jpeg_uri(np.asarray(rgb), quality)


def tile_size(shape: tuple[int, int], thumb: int) -> tuple[int, int]:
    """(width, height) of a tile: the longer side ``thumb`` pixels (never enlarged), aspect kept."""
    h, w = shape
    scale = min(1.0, thumb / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize(arr: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    mode = "F" if arr.dtype.kind == "f" else None
    im = Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)
    return np.asarray(im.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR))


def _jet(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> RGB uint8 of the jet colour map (blue, cyan, yellow, red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], -1) * 255).astype(np.uint8)


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """A map in [0, 1] over the image (same size), jet colours, ``alpha`` of the heat."""
    out = (1 - alpha) * image.astype(np.float32) + alpha * _jet(heat).astype(np.float32)
    return out.round().astype(np.uint8)


def label_overlay(image: np.ndarray, label: np.ndarray, colours: np.ndarray, background: bool,
                  alpha: float = 0.6) -> np.ndarray:
    """A label map over the image (same size): each class in its colour (``alpha``), background dimmed,
    ignore (255) whitened."""
    img = image.astype(np.float32)
    out = (1 - alpha) * img + alpha * colours[label].astype(np.float32)
    if background:
        out = np.where((label == 0)[..., None], 0.45 * img, out)
    return out.round().astype(np.uint8)
