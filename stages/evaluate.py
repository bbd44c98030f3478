"""Stage 6: score maps, pseudo-masks and baselines against GT -> metrics.json, per_class.md, plots."""

from __future__ import annotations

import time

from pipeline.config import Config
from pipeline.data import check_mask_sizes
from pipeline.evaluation import (
    evaluate_baselines,
    evaluate_labels,
    evaluate_maps,
    format_per_class,
    format_table,
    gt_masks,
    plot_sweep,
)
from pipeline.maps.generate import is_per_image
from pipeline.runfolder import (
    Stage,
    fingerprint,
    read_json,
    stage_fingerprint,
    stage_seconds,
    write_json,
    write_text,
)
from stages.common import log, maps_dataset, masks_fingerprint

UPSTREAM = ("train_classifier", "make_maps", "refine", "export")


def run(cfg: Config, force: bool = False) -> None:
    run_dir = cfg.run_path
    ds = maps_dataset(cfg)
    fp = fingerprint(cfg.section_hash("evaluate"), [stage_fingerprint(run_dir, s) for s in UPSTREAM],
                     masks_fingerprint(ds))
    stage = Stage(run_dir, "evaluate", fp)
    if stage.is_done() and not force:
        log.info("evaluate: up to date, skipped\n%s", format_table(read_json(run_dir / "metrics.json")))
        return
    check_mask_sizes(ds)
    stage.begin(fresh=force)
    t0 = time.perf_counter()

    gts = gt_masks(ds)
    train_done = run_dir / "train_classifier.done.json"
    metrics: dict = {"classifier": {"val_map": read_json(train_done).get("val_map") if train_done.exists()
                                    else None}}
    if not gts:
        log.warning("evaluate: %s has no ground-truth masks for split %r; only the classifier is scored",
                    cfg.data.root, cfg.maps.split)
    else:
        metrics["maps"] = {m: evaluate_maps(ds, gts, run_dir / "maps" / m, cfg.evaluate.sweep)
                           for m in cfg.maps.methods if is_per_image(m)}
        for m, result in metrics["maps"].items():
            if "sweep" in result:
                plot_sweep(result, m, run_dir / "plots" / f"sweep_{m}.png")
        metrics["pseudo_masks"] = {r: {**evaluate_labels(ds, gts, run_dir / "refined" / r), "maps": cfg.refine.method}
                                   for r in cfg.refine.refiners}
        metrics["baselines"] = evaluate_baselines(ds, gts)
    metrics["timing_s"] = {**stage_seconds(run_dir), "evaluate": round(time.perf_counter() - t0, 2)}
    write_json(run_dir / "metrics.json", metrics)
    write_text(run_dir / "per_class.md", format_per_class(metrics))
    log.info("evaluate: %s\n%s", run_dir / "metrics.json", format_table(metrics))
    stage.finish()
