"""The report's "Confidence and review queue" section: what a run without GT masks can say of its own pseudo-masks
(``pipeline.confidence``, from the export's manifest.json). The classes ranked by confidence, a plain warning for
each unreliable class (ranked within the run: ``pipeline.confidence.unreliable_classes``), the IoU of the exported set
beside the confidence when the dataset has GT, and the review queue: the least-confident images first, as image |
exported mask | where the other label sets disagree."""

from __future__ import annotations

from typing import Any

import numpy as np

import pipeline.report.figures as fg
from pipeline.confidence import NOISE, read_confidence, review_order
from pipeline.data import read_image, read_mask
from pipeline.report.html import cards, e, fmt, grid, img, note, num, swatch, table

DISAGREE = np.array([230, 40, 40], np.float32)  # pixels where another label set gives another label


def _bar(value: float | None, unreliable: bool) -> str:
    if value is None:
        return "<td></td>"
    colour = "#c0392b" if unreliable else "#2e8b57"
    return f'<td><span class="bar" style="width:{max(1, round(160 * value))}px;background:{colour}"></span></td>'


def disagreement(image: np.ndarray, exported: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
    """The image dimmed, red where any other label set labels a pixel otherwise than the exported mask (both
    labelling it), white where the exported mask ignores it."""
    diff = np.zeros(exported.shape, bool)
    for other in others:
        diff |= (other != exported) & (other != 255) & (exported != 255)
    out = 0.45 * image.astype(np.float32)
    out[diff] = 0.3 * out[diff] + 0.7 * DISAGREE
    out[exported == 255] = 0.5 * out[exported == 255] + 0.5 * 255
    return out.round().astype(np.uint8)


def confidence_section(builder: Any) -> str:
    """The section's HTML for a ``pipeline.report.build.ReportBuilder``."""
    run, ds, metrics = builder.run, builder.ds, builder.metrics
    manifest = read_confidence(run)
    summary = (manifest or {}).get("confidence")
    if not summary:
        return note("No confidence: the export stage has not run, or ran before confidence existed (rerun it with "
                    "<code>--force</code>).")
    exported = manifest.get("refiner")
    per_class = summary.get("per_class") or {}
    ious = (metrics.get("confidence") or {}).get("iou") or {}
    unreliable = summary.get("unreliable") or []
    median = summary.get("median")
    out = cards([("mean image confidence", fmt(summary.get("mean"), 2)), ("exported label set", e(exported)),
                 ("unreliable classes", str(len(unreliable))), ("corrected masks", str(summary.get("corrected", 0)))])
    out += "".join(f'<p class="warn">⚠ {e(c)}: confidence {per_class[c]:.2f}, among the lowest of this run'
                   f'{f" (median {median:.2f})" if median is not None else ""}. Its masks are likely the worst; '
                   "review them (<code>wsss review</code>) before training on them, or leave the class out.</p>"
                   for c in unreliable)
    rows = []
    for c in sorted(per_class, key=per_class.get):
        colour = builder.colours[ds.label_names.index(c)]
        rows.append([f'<td class="k">{swatch(colour, c)}</td>', num(per_class[c], 2), _bar(per_class[c],
                     c in unreliable), *([num(ious.get(c))] if ious else []),
                     f"<td>{'unreliable' if c in unreliable else ''}</td>"])
    out += table(["class", "confidence", "", *(["IoU (GT)"] if ious else []), ""], rows)
    quartile = summary.get("quartile")
    below = f" (below {quartile:.2f})" if quartile is not None else ""
    rule = (f"a class in the lowest quarter of this run's classes{below}"
            f" and below the run's median by more than {NOISE:g} standard errors of its mean: ranked within the run, "
            "since the confidence's level differs between datasets")
    out += note(
        "Confidence in [0, 1] without GT (pipeline/confidence.py): the mean of the agreement of the exported set "
        f"<code>{e(exported)}</code> with the run's other label sets, the map's margin for the mask's labels, and "
        "the share of pixels not ignored; per class over the images whose labels name it, a class the mask misses "
        f"counting 0. Unreliable: {rule}."
        + (" IoU: the exported set against the GT masks, beside it." if ious else
           " No GT masks: these are the run's quality figures."))
    return out + "<h3>Review queue</h3>" + _queue(builder, manifest, exported)


def _queue(builder: Any, manifest: dict, exported: str) -> str:
    run, ds, opts = builder.run, builder.ds, builder.opts
    order = review_order(manifest)[:opts.samples]
    if not order:
        return note("No image to review: every mask was corrected.")
    others = [r for r in builder.refiners if r != exported and (run / "refined" / r).is_dir()]
    samples = {s.id: s for s in ds.samples}
    sets = f"{len(others)} other set" + ("" if len(others) == 1 else "s")
    header = ["image", f"mask: {exported}", f"disagreement ({sets})"]
    width = max(64, min(opts.thumb, 1300 // len(header) - 6))
    rows = []
    for i in order:
        s, entry = samples.get(i), manifest["images"][i]
        if s is None:
            continue
        image = read_image(s.image_path)
        size = fg.tile_size(image.shape[:2], opts.thumb)
        small = fg.resize(image, size)
        label = read_mask(run / "pseudo_masks" / "SegmentationClass" / f"{i}.png")
        theirs = [read_mask(p) for p in (run / "refined" / r / f"{i}.png" for r in others) if p.exists()]
        theirs = [fg.resize(t, size, nearest=True) for t in theirs if t.shape == label.shape]
        mine = fg.resize(label, size, nearest=True)
        tiles = [fg.jpeg_uri(small, opts.jpeg_quality),
                 fg.jpeg_uri(fg.label_overlay(small, mine, builder.colours, ds.background), opts.jpeg_quality),
                 fg.jpeg_uri(disagreement(small, mine, theirs), opts.jpeg_quality)]
        scale = width / max(image.shape[:2])
        dw, dh = round(image.shape[1] * scale), round(image.shape[0] * scale)
        cells = "".join(f"<td>{img(t, f'{i} {h}', width=dw, height=dh)}</td>" for t, h in zip(tiles, header,
                                                                                           strict=True))
        classes = entry.get("class_confidence") or {}
        weak = ", ".join(f"{e(c)} {v['confidence']:.2f}" for c, v in sorted(classes.items(),
                                                                          key=lambda kv: kv[1]["confidence"]))
        cap = f"<b>{e(i)}</b> · confidence <b>{entry.get('confidence', 0):.2f}</b> · classes: {weak}"
        rows.append((cap, cells))
    return grid(header, rows) + note(
        f"The {len(rows)} least-confident images (<code>report.samples</code>), first to review: the exported mask, "
        "and in red the pixels where another label set gives another label (white: ignored). "
        "<code>wsss review --limit N</code> writes them as a CVAT package; docs/review.md says how to correct "
        "them and import them back.")
