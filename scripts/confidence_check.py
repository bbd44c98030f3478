"""How well the GT-free confidence (pipeline/confidence.py) predicts the quality of a run's masks, from an existing run
folder and without rerunning a stage (it writes nothing into the run folder; GT is used only to score):

- per image: Spearman correlation between the confidence and the per-image mIoU of the exported masks;
- per class: Spearman correlation between the class confidence over the run and the class IoU of the exported set;
  the five least-confident classes;
- the review's worth on masks: the exported set's mIoU after replacing the masks of the 10% least-confident images
  with their GT, against 10% random images (mean of ``--draws`` draws);
- with ``--choose``: each complete label set's mean confidence (against the others) and mIoU, i.e. whether choosing
  the exported set by confidence would beat ``export.refiner: auto``'s fixed order;
- with ``--signals``: the two signals the confidence leaves out, the classifier's probability of each of the image's
  labels and SAM's predicted IoU of each class's prompts (computed here again: the run keeps neither), each alone and
  each added to the plain mean, scored by the same three measures;
- with ``--saliency`` (a run with the salient-object prior): the mask's agreement with the salient-object maps as a
  signal, scored the same way: a thing's mean salient probability over its mask, a stuff class's 1 minus it (the
  run's ``things.json``; a class read as either has no value).

``python scripts/confidence_check.py --config configs/msrc21.yaml --run runs/msrc21 [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.confidence import run_confidence, summarise  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import maps_dataset, read_image, read_mask  # noqa: E402
from pipeline.export import export_refiner  # noqa: E402
from pipeline.maps.inference import to_tensor  # noqa: E402
from pipeline.maps.io import load_maps  # noqa: E402
from pipeline.metrics import ConfusionMatrix  # noqa: E402
from pipeline.models import load_classifier  # noqa: E402
from pipeline.refine import label_sets  # noqa: E402
from pipeline.refine.sam import (  # noqa: E402
    embedding,
    image_decoder,
    kept_masks,
    load_model,
    one_thread,
    stuff_rows_of,
)
from pipeline.saliency import STUFF, THING, read_map, run_prior  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    return float(spearmanr(a, b).statistic)


def complete_sets(cfg, ds) -> dict[str, str]:
    """The run's label sets (refined/<set>/) that hold a mask for every image, -> the maps they refine."""
    run = cfg.run_path
    return {r: m for r, m in label_sets(cfg).items()
            if all((run / "refined" / r / f"{s.id}.png").exists() for s in ds.samples)}


def miou_with(ds, gts, masks: dict[str, np.ndarray]) -> float:
    conf = ConfusionMatrix(ds.num_labels)
    for s in ds.samples:
        conf.update(gts[s.id], masks[s.id])
    return conf.miou()


def classifier_probabilities(cfg, ds, checkpoint: Path) -> dict[str, dict[str, float]]:
    """Image id -> {class name: the classifier's sigmoid probability of it}, for the image's own labels: the
    whole upright image at its size, as make_maps sees it at scale 1."""
    net, ckpt = load_classifier(checkpoint, "cpu")
    out = {}
    with torch.inference_mode():
        for s in ds.samples:
            p = torch.sigmoid(net(to_tensor(read_image(s.image_path), ckpt["mean"], ckpt["std"], "cpu")))[0]
            out[s.id] = {ds.classes[c]: float(p[c]) for c in s.labels}
    return out


def sam_predicted_iou(cfg, ds, maps_dir: Path) -> dict[str, dict[str, float]]:
    """Image id -> {class name: the mean predicted IoU of the SAM masks that the sam refiner keeps for the class}:
    its prompts on ``maps_dir``'s maps and its choice of mask (``kept_masks``), the embeddings from the run's cache.
    Classes with no kept mask are left out."""
    s = cfg.refine.sam
    model = load_model(s, "cpu")
    out = {}
    for smp in ds.samples:
        image = read_image(smp.image_path)
        maps, classes = load_maps(maps_dir / f"{smp.id}.npz", ds.classes)
        with one_thread():
            emb = embedding(image, model, cfg.run_path / "cache" / "sam" / smp.id)
        ious: dict[int, list[float]] = {}
        for k, _, _, iou in kept_masks(maps.astype(np.float32), image_decoder(model, emb, image, s), s,
                                       stuff_rows_of(classes, ds.classes, s)):
            ious.setdefault(k, []).append(float(np.clip(iou, 0.0, 1.0)))
        out[smp.id] = {ds.classes[int(classes[k])]: float(np.mean(v)) for k, v in ious.items()}
    return out


def extra_signals(cfg, ds, exported: str, maps: str) -> dict[str, dict[str, dict[str, float]]]:
    """The signals the confidence leaves out, for the exported set: ``classifier`` (the checkpoint that made its
    maps: the decoupled round's for a ``_dc`` set) and, for a sam set, ``sam_iou``."""
    run = cfg.run_path
    ckpt = run / ("classifier_dc.pt" if "_dc" in exported and (run / "classifier_dc.pt").exists() else "classifier.pt")
    out = {"classifier": classifier_probabilities(cfg, ds, ckpt)}
    if exported.startswith("sam"):
        out["sam_iou"] = sam_predicted_iou(cfg, ds, run / "maps" / maps)
    return out


def saliency_agreement(cfg, ds, masks: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Image id -> {class name: the agreement of its mask (``masks``: the exported set's) with the salient-object
    map}: the mean salient probability over the mask for a thing, 1 minus it for stuff; classes read as either, or
    without pixels in the mask, are left out."""
    run = cfg.run_path
    kinds = run_prior(run, ds.classes).kinds
    out = {}
    for s in ds.samples:
        mask = masks[s.id]
        sal = read_map(run, s.id, mask.shape)
        out[s.id] = {}
        for c in s.labels:
            pixels = mask == ds.label_of(c)
            if kinds[c] in (THING, STUFF) and pixels.any():
                inside = float(sal[pixels].mean())
                out[s.id][ds.classes[c]] = inside if kinds[c] == THING else 1.0 - inside
    return out


def signal_variants(per_image: dict, extra: dict) -> dict[str, dict]:
    """Per-image confidence entries (as run_confidence gives them) for: the confidence as it is, each extra signal
    alone, each added to the plain mean, and all added. An image's value of a signal is the mean over its classes;
    a class the mask misses keeps confidence 0, as in the confidence."""
    def variant(names: tuple[str, ...], alone: bool) -> dict:
        out = {}
        for i, v in per_image.items():
            sig = {} if alone else {k: x for k, x in v["confidence_signals"].items() if x is not None}
            cls = {}
            for name, c in v["class_confidence"].items():
                base = {} if alone else {k: c[k] for k in ("agreement", "margin") if c.get(k) is not None}
                add = {n: extra[n][i][name] for n in names if name in extra[n].get(i, {})}
                vals = list((base | add).values()) or [c["confidence"]]  # no value of the signal: as it is
                cls[name] = {"confidence": 0.0 if c.get("missing") else float(np.mean(vals))}
            for n in names:
                vals = list(extra[n].get(i, {}).values())
                if vals:
                    sig[n] = float(np.mean(vals))
            out[i] = {"confidence": float(np.mean(list(sig.values()))) if sig else v["confidence"],
                      "class_confidence": cls}
        return out

    names = tuple(extra)
    variants = {"as it is": per_image}
    for n in names:
        variants[f"{n} alone"] = variant((n,), True)
        variants[f"+ {n}"] = variant((n,), False)
    if len(names) > 1:
        variants["+ " + " + ".join(names)] = variant(names, False)
    return variants


def check(cfg, exported: str | None, draws: int, fraction: float, choose: bool, signals: bool,
          saliency: bool = False) -> dict:
    ds = maps_dataset(cfg)
    run = cfg.run_path
    sets = complete_sets(cfg, ds)
    exported = export_refiner(exported or cfg.export.refiner, list(sets))
    gts = {s.id: read_mask(s.mask_path) for s in ds.samples}
    t0 = time.perf_counter()
    per_image = run_confidence(ds, run / "refined", exported, [r for r in sets if r != exported],
                               run / "maps" / sets[exported], cfg.refine.threshold.fg)
    seconds = (time.perf_counter() - t0) / len(ds)
    masks = {s.id: read_mask(run / "refined" / exported / f"{s.id}.png") for s in ds.samples}

    ids = [s.id for s in ds.samples]
    image_miou, total = {}, ConfusionMatrix(ds.num_labels)
    for i in ids:
        c = ConfusionMatrix(ds.num_labels)
        c.update(gts[i], masks[i])
        image_miou[i] = c.miou()
        total.update(gts[i], masks[i])
    iou = total.per_class(ds.label_names)
    n = max(1, round(fraction * len(ids)))
    rng = np.random.default_rng(0)
    random = []
    for _ in range(draws):
        pick = set(rng.choice(ids, n, replace=False).tolist())
        random.append(miou_with(ds, gts, {i: gts[i] if i in pick else masks[i] for i in ids}))
    base = miou_with(ds, gts, masks)

    def measure(per_image: dict) -> dict:
        """Spearman per image and per class, the least-confident classes and the review's worth of a confidence."""
        summary = summarise(per_image, ds.classes)
        keep = [i for i in ids if not np.isnan(image_miou[i])]
        rho_img = spearman([per_image[i]["confidence"] for i in keep], [image_miou[i] for i in keep])
        classes = [c for c in summary["per_class"] if (iou.get(c) or {}).get("iou") is not None]
        rho_cls = spearman([summary["per_class"][c] for c in classes], [iou[c]["iou"] for c in classes])
        worst = sorted(summary["per_class"], key=summary["per_class"].get)[:5]
        least = set(sorted(ids, key=lambda i: (per_image[i]["confidence"], i))[:n])
        reviewed = miou_with(ds, gts, {i: gts[i] if i in least else masks[i] for i in ids})
        return {"spearman_image": round(rho_img, 3), "spearman_class": round(rho_cls, 3),
                "least_confident_classes": [(c, summary["per_class"][c], round(iou[c]["iou"], 3)) for c in worst],
                "per_class": {c: {"confidence": summary["per_class"][c], "iou": round(iou[c]["iou"], 3)}
                              for c in classes},
                "review": {"fraction": fraction, "images": n, "miou": round(base, 4),
                           "least_confident_to_gt": round(reviewed, 4),
                           "random_to_gt": round(float(np.mean(random)), 4),
                           "random_draws": [round(v, 4) for v in random],
                           "gain_ratio": round((reviewed - base) / (float(np.mean(random)) - base), 2)}}

    out = {"run": str(run), "images": len(ids), "exported": exported, "other_sets": [r for r in sets if r != exported],
           "seconds_per_image": round(seconds, 4), **measure(per_image)}
    extra = extra_signals(cfg, ds, exported, sets[exported]) if signals else {}
    if saliency:
        extra["saliency"] = saliency_agreement(cfg, ds, masks)
    if extra:
        out["signals"] = {name: {k: v for k, v in measure(variant).items() if k != "per_class"}
                          for name, variant in signal_variants(per_image, extra).items()}
    if choose:
        out["choose"], scores, labels = {}, {}, {}
        for r, maps in sets.items():
            c = run_confidence(ds, run / "refined", r, [o for o in sets if o != r], run / "maps" / maps,
                               cfg.refine.threshold.fg)
            labels[r] = {s.id: read_mask(run / "refined" / r / f"{s.id}.png") for s in ds.samples}
            scores[r] = {i: c[i]["confidence"] for i in ids}
            out["choose"][r] = {"mean_confidence": summarise(c, ds.classes)["mean"],
                                "miou": round(miou_with(ds, gts, labels[r]), 4)}
        # per image: the set whose mask of that image is the most confident (ties: the fixed order's first)
        best = {i: max(sets, key=lambda r: (scores[r][i], -list(sets).index(r))) for i in ids}
        out["choose_per_image"] = {"miou": round(miou_with(ds, gts, {i: labels[best[i]][i] for i in ids}), 4),
                                   "picked": {r: sum(1 for v in best.values() if v == r) for r in sets}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run", help="the run folder (default: the config's run_dir)")
    parser.add_argument("--exported", help="the label set to score (default: what export.refiner picks of the "
                                           "complete sets)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--choose", action="store_true", help="also each set's mean confidence and mIoU")
    parser.add_argument("--signals", action="store_true",
                        help="also the classifier's probability and SAM's predicted IoU as signals")
    parser.add_argument("--saliency", action="store_true",
                        help="also the masks' agreement with the salient-object maps as a signal")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    cfg = load_config(args.config, {"run_dir": args.run} if args.run else {})
    out = check(cfg, args.exported, args.draws, args.fraction, args.choose, args.signals, args.saliency)
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
