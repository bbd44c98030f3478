"""How well the GT-free confidence (pipeline/confidence.py) predicts the quality of a run's masks, from an existing run
folder and without rerunning a stage (it writes nothing into the run folder; GT is used only to score):

- per image: Spearman correlation between the confidence and the per-image mIoU of the exported masks;
- per class: Spearman correlation between the class confidence over the run and the class IoU of the exported set;
  the five least-confident classes;
- the review's worth on masks: the exported set's mIoU after replacing the masks of the 10% least-confident images
  with their GT, against 10% random images (mean of ``--draws`` draws);
- with ``--choose``: each complete label set's mean confidence (against the others) and mIoU, i.e. whether choosing
  the exported set by confidence would beat ``export.refiner: auto``'s fixed order.

``python scripts/confidence_check.py --config configs/msrc21.yaml --run runs/msrc21 [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.confidence import run_confidence, summarise  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import read_mask  # noqa: E402
from pipeline.export import export_refiner  # noqa: E402
from pipeline.metrics import ConfusionMatrix  # noqa: E402
from pipeline.refine import label_sets  # noqa: E402
from stages.common import maps_dataset  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

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


def check(cfg, exported: str | None, draws: int, fraction: float, choose: bool) -> dict:
    ds = maps_dataset(cfg)
    run = cfg.run_path
    sets = complete_sets(cfg, ds)
    exported = export_refiner(exported or cfg.export.refiner, list(sets))
    gts = {s.id: read_mask(s.mask_path) for s in ds.samples}
    t0 = time.perf_counter()
    per_image = run_confidence(ds, run / "refined", exported, [r for r in sets if r != exported],
                               run / "maps" / sets[exported], cfg.refine.threshold.fg)
    seconds = (time.perf_counter() - t0) / len(ds)
    summary = summarise(per_image, ds.classes)
    masks = {s.id: read_mask(run / "refined" / exported / f"{s.id}.png") for s in ds.samples}

    ids = [s.id for s in ds.samples]
    image_miou = []
    for i in ids:
        c = ConfusionMatrix(ds.num_labels)
        c.update(gts[i], masks[i])
        image_miou.append(c.miou())
    conf_img = [per_image[i]["confidence"] for i in ids]
    keep = [k for k, v in enumerate(image_miou) if not np.isnan(v)]
    rho_img = spearman([conf_img[k] for k in keep], [image_miou[k] for k in keep])

    total = ConfusionMatrix(ds.num_labels)
    for i in ids:
        total.update(gts[i], masks[i])
    iou = total.per_class(ds.label_names)
    classes = [c for c in summary["per_class"] if (iou.get(c) or {}).get("iou") is not None]
    rho_cls = spearman([summary["per_class"][c] for c in classes], [iou[c]["iou"] for c in classes])
    worst = sorted(summary["per_class"], key=summary["per_class"].get)[:5]

    n = max(1, round(fraction * len(ids)))
    base = miou_with(ds, gts, masks)
    least = set(sorted(ids, key=lambda i: (per_image[i]["confidence"], i))[:n])
    reviewed = miou_with(ds, gts, {i: gts[i] if i in least else masks[i] for i in ids})
    rng = np.random.default_rng(0)
    random = []
    for _ in range(draws):
        pick = set(rng.choice(ids, n, replace=False).tolist())
        random.append(miou_with(ds, gts, {i: gts[i] if i in pick else masks[i] for i in ids}))
    out = {"run": str(run), "images": len(ids), "exported": exported, "other_sets": [r for r in sets if r != exported],
           "seconds_per_image": round(seconds, 4),
           "spearman_image": round(rho_img, 3), "spearman_class": round(rho_cls, 3),
           "least_confident_classes": [(c, summary["per_class"][c], round(iou[c]["iou"], 3)) for c in worst],
           "per_class": {c: {"confidence": summary["per_class"][c], "iou": round(iou[c]["iou"], 3)} for c in classes},
           "review": {"fraction": fraction, "images": n, "miou": round(base, 4),
                      "least_confident_to_gt": round(reviewed, 4), "random_to_gt": round(float(np.mean(random)), 4),
                      "random_draws": [round(v, 4) for v in random]}}
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
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    cfg = load_config(args.config, {"run_dir": args.run} if args.run else {})
    out = check(cfg, args.exported, args.draws, args.fraction, args.choose)
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
