"""Scoring against ground truth: map methods (best threshold from a sweep), pseudo-masks, baselines.

Baselines keep progress honest:
- ``background`` / ``most_frequent``: every pixel background (with a background class), or else every
  pixel the image's class that is most frequent among the split's image-level labels;
- ``all_present``: every present class painted over the whole image, ties split by class order (so the
  first present class wins everywhere) -- what a classifier that knows the labels but not where gives.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import CRFConfig
from pipeline.data import SegDataset, read_mask
from pipeline.data.dataset import Sample
from pipeline.maps.io import load_maps
from pipeline.metrics import ConfusionMatrix
from pipeline.models.segmenter import load_segmenter
from pipeline.refine.threshold import threshold_labels
from pipeline.runfolder import save_figure
from pipeline.segmenter.predict import Predictor, score_segmenter


def gt_masks(ds: SegDataset) -> dict[str, np.ndarray]:
    return {s.id: read_mask(s.mask_path) for s in tqdm(ds.samples, desc="read GT", leave=False) if s.mask_path}


def mean_recall(conf: ConfusionMatrix, ds: SegDataset) -> float:
    """How much of each object the prediction covers: recall averaged over the classes, background left out."""
    return float(np.nanmean(conf.scores()["recall"][int(ds.background):]))


def score_summary(conf: ConfusionMatrix, ds: SegDataset) -> dict[str, Any]:
    return {"miou": round(conf.miou(), 4), "mean_recall": round(mean_recall(conf, ds), 4),
            "pixel_accuracy": round(conf.pixel_accuracy(), 4), "ignore_ratio": round(conf.ignore_ratio(), 4),
            "per_class": conf.per_class(ds.label_names)}


def evaluate_maps(ds: SegDataset, gts: dict[str, np.ndarray], maps_dir: Path,
                  sweep: list[float]) -> dict[str, Any]:
    """mIoU of one map method. With background, at the best threshold of the sweep (curve kept);
    without, the argmax over the image's classes."""
    thresholds = sweep if ds.background else [0.0]
    confs = [ConfusionMatrix(ds.num_labels) for _ in thresholds]
    for s in tqdm(ds.samples, desc=f"score {maps_dir.name}", leave=False):
        if s.id not in gts:
            continue
        maps, classes = load_maps(maps_dir / f"{s.id}.npz", ds.classes)
        for t, conf in zip(thresholds, confs, strict=True):
            conf.update(gts[s.id], threshold_labels(maps, classes, ds.background, fg=t))
    mious = [c.miou() for c in confs]
    best = int(np.nanargmax(mious))
    out = score_summary(confs[best], ds)
    out["threshold"] = thresholds[best] if ds.background else None
    if ds.background:
        out["sweep"] = {"threshold": thresholds, "miou": [round(m, 4) for m in mious]}
    return out


def evaluate_labels(ds: SegDataset, gts: dict[str, np.ndarray], label_dir: Path) -> dict[str, Any]:
    conf = ConfusionMatrix(ds.num_labels)
    for s in tqdm(ds.samples, desc=f"score {label_dir.name}", leave=False):
        if s.id in gts:
            conf.update(gts[s.id], read_mask(label_dir / f"{s.id}.png", gts[s.id].shape))
    return score_summary(conf, ds)


def _baseline_label(ds: SegDataset, s: Sample, name: str, frequency: Counter) -> int:
    if name == "background":
        return 0
    if name == "most_frequent":
        return ds.label_of(max(s.labels, key=lambda c: (frequency[c], -c)))
    return ds.label_of(min(s.labels))  # all_present: ties split by class order


def baseline_names(ds: SegDataset) -> list[str]:
    return ["background" if ds.background else "most_frequent", "all_present"]


def evaluate_baselines(ds: SegDataset, gts: dict[str, np.ndarray]) -> dict[str, Any]:
    frequency = Counter(c for s in ds.samples for c in s.labels)
    out = {}
    for name in baseline_names(ds):
        conf = ConfusionMatrix(ds.num_labels)
        for s in ds.samples:
            if s.id in gts:
                conf.update(gts[s.id], np.full_like(gts[s.id], _baseline_label(ds, s, name, frequency)))
        out[name] = score_summary(conf, ds)
    return out


def evaluate_segmenters(run_dir: Path, val: SegDataset, device, flip: bool, crf: CRFConfig | None,
                        upper_bound: bool, scales: tuple[float, ...] = (1.0,)) -> dict[str, Any]:
    """The segmenter (``segmenter.pt``) and, with ``upper_bound``, its GT twin (``segmenter_gt.pt``) on the val
    split's GT: ``miou``, ``upper_bound_miou`` and ``ratio`` (their quotient), then the same with the CRF
    post-processing (``crf_*``) when ``crf`` is given; the full scores of each under ``models.<checkpoint name>``.
    Predictions average the mirror image with ``flip`` and the ``scales`` (multi-scale testing)."""
    scores: dict[str, dict[str, Any]] = {}
    for name in ("segmenter", "segmenter_gt") if upper_bound else ("segmenter",):
        path = Path(run_dir) / f"{name}.pt"
        net, ckpt = load_segmenter(path, device)
        confs = score_segmenter(Predictor(net, ckpt, device, flip, crf, scales), val, desc=f"score {name}")
        scores[name] = {"masks": ckpt["masks"], **score_summary(confs["raw"], val)}
        if "crf" in confs:
            scores[name]["crf"] = score_summary(confs["crf"], val)
    main, twin = scores["segmenter"], scores.get("segmenter_gt")
    out: dict[str, Any] = {"miou": main["miou"]}
    if "crf" in main:
        out["crf_miou"] = main["crf"]["miou"]
    if twin is not None:
        out["upper_bound_miou"] = twin["miou"]
        out["ratio"] = round(out["miou"] / max(out["upper_bound_miou"], 1e-9), 4)
        if "crf" in twin:
            out["upper_bound_crf_miou"] = twin["crf"]["miou"]
            out["crf_ratio"] = round(out["crf_miou"] / max(out["upper_bound_crf_miou"], 1e-9), 4)
    return {**out, "models": scores}


def plot_sweep(result: dict[str, Any], method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(result["sweep"]["threshold"], result["sweep"]["miou"], marker="o", ms=3)
    ax.axvline(result["threshold"], color="gray", ls="--", lw=1)
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU")
    ax.set_title(f"{method}: best {result['miou']:.3f} at {result['threshold']:.2f}")
    ax.grid(alpha=0.3)
    save_figure(path, fig)
    plt.close(fig)


def format_table(metrics: dict[str, Any]) -> str:
    """The mIoU table printed at the end of a run."""
    rows = []
    for method, r in metrics.get("maps", {}).items():
        extra = f"threshold {r['threshold']:.2f}" if r.get("threshold") is not None else "argmax"
        rows.append((f"maps/{method}", r["miou"], extra))
    for refiner, r in metrics.get("pseudo_masks", {}).items():
        rows.append((f"pseudo_masks/{refiner}", r["miou"], f"ignore {r['ignore_ratio']:.1%}"))
    for name, r in metrics.get("baselines", {}).items():
        rows.append((f"baseline/{name}", r["miou"], ""))
    seg = metrics.get("segmenter")
    if seg:
        split = f"{seg['split']} split"
        rows.append(("segmenter", seg["miou"], f"{split}, {seg['models']['segmenter']['masks']} masks"))
        if "crf_miou" in seg:
            rows.append(("segmenter+crf", seg["crf_miou"], split))
        if "upper_bound_miou" in seg:
            rows.append(("segmenter_gt", seg["upper_bound_miou"], f"{split}, GT masks: ratio {seg['ratio']:.3f}"))
        if "upper_bound_crf_miou" in seg:
            rows.append(("segmenter_gt+crf", seg["upper_bound_crf_miou"], f"{split}, ratio {seg['crf_ratio']:.3f}"))
    width = max([len(r[0]) for r in rows] + [10])
    lines = [f"{'':{width}}  mIoU", *(f"{n:{width}}  {m:.3f}  {e}" for n, m, e in rows)]
    val_map = metrics.get("classifier", {}).get("val_map")
    if val_map is not None:
        lines.insert(0, f"classifier val mAP {val_map:.3f}")
    return "\n".join(lines)


def format_per_class(metrics: dict[str, Any]) -> str:
    """Markdown tables of per-class IoU / precision / recall for every scored map method and refiner."""
    out = []
    sections = [("maps", m, r) for m, r in metrics.get("maps", {}).items()]
    sections += [("pseudo_masks", m, r) for m, r in metrics.get("pseudo_masks", {}).items()]
    sections += [("segmenter", m, r) for m, r in metrics.get("segmenter", {}).get("models", {}).items()]
    for kind, name, result in sections:
        out += [f"## {kind}/{name}: mIoU {result['miou']:.3f}", "", "| class | IoU | precision | recall |",
                "|---|---|---|---|"]
        for cls, s in result["per_class"].items():
            cells = ["–" if s[k] is None else f"{s[k]:.3f}" for k in ("iou", "precision", "recall")]
            out.append(f"| {cls} | {' | '.join(cells)} |")
        out.append("")
    return "\n".join(out)
