"""Stage 6: score maps, pseudo-masks and baselines against GT -> metrics.json, per_class.md, plots."""

from __future__ import annotations

import time

from pipeline.confidence import confidence_metrics, read_confidence
from pipeline.config import Config
from pipeline.data import check_mask_sizes, load_dataset, maps_dataset
from pipeline.device import resolve_device
from pipeline.evaluation import (
    evaluate_baselines,
    evaluate_labels,
    evaluate_maps,
    evaluate_segmenters,
    format_per_class,
    format_table,
    gt_masks,
    plot_sweep,
)
from pipeline.refine import label_sets, map_sets
from pipeline.runfolder import (
    Stage,
    fingerprint,
    read_json,
    stage_fingerprint,
    stage_seconds,
    write_json,
    write_text,
)
from pipeline.segmenter.predict import checked_scales
from pipeline.stage_names import upstream_markers
from stages.common import log, masks_fingerprint, refiner_inputs, section_inputs
from stages.faithfulness import faithfulness_of_run

UPSTREAM = upstream_markers("evaluate")  # every stage before this one, the segmenters' sub-stages too


def run(cfg: Config, force: bool = False) -> None:
    run_dir = cfg.run_path
    ds = maps_dataset(cfg)
    stage = Stage(run_dir, "evaluate", fingerprint(_own_inputs(cfg), [stage_fingerprint(run_dir, s) for s in UPSTREAM],
                                                   masks_fingerprint(ds)))
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
        # maps.methods, the affinity stage's walked maps, the decoupled round's
        metrics["maps"] = {m: evaluate_maps(ds, gts, run_dir / "maps" / m, cfg.evaluate.sweep)
                           for m in map_sets(cfg)}
        for m, result in metrics["maps"].items():
            if "sweep" in result:
                plot_sweep(result, m, run_dir / "plots" / f"sweep_{m}.png")
        metrics["pseudo_masks"] = {r: {**evaluate_labels(ds, gts, run_dir / "refined" / r), "maps": maps}
                                   for r, maps in label_sets(cfg).items()}
        metrics["baselines"] = evaluate_baselines(ds, gts)
    confidence = confidence_metrics(read_confidence(run_dir), metrics.get("pseudo_masks"))  # no GT needed
    if confidence is not None:
        metrics["confidence"] = confidence
    faithfulness_s = None
    if cfg.evaluate.faithfulness.enabled:  # cached in faithfulness.json: only what changed is recomputed
        t1 = time.perf_counter()
        metrics["faithfulness"] = faithfulness_of_run(cfg, ds, gts)
        faithfulness_s = round(time.perf_counter() - t1, 2)
    segmenter = _segmenter_metrics(cfg)
    if segmenter is not None:
        metrics["segmenter"] = segmenter
    metrics["timing_s"] = {**stage_seconds(run_dir), "evaluate": round(time.perf_counter() - t0, 2)}
    if faithfulness_s is not None:
        metrics["timing_s"]["faithfulness"] = faithfulness_s  # part of evaluate's time
    write_json(run_dir / "metrics.json", metrics)
    write_text(run_dir / "per_class.md", format_per_class(metrics))
    log.info("evaluate: %s\n%s", run_dir / "metrics.json", format_table(metrics))
    stage.finish()


def _own_inputs(cfg: Config) -> dict:
    """The config keys evaluate reads itself: its own (the faithfulness options where it is on) and how the
    segmenters predict (refine.crf's kernels with segmenter.crf); what made the outputs it scores is in the
    identities of the stages before it."""
    s = cfg.segmenter
    predict = {k: getattr(s, k) for k in ("enabled", "masks", "upper_bound", "crf", "flip_test", "test_scales")}
    crf = refiner_inputs(cfg, ["crf"]) if s.enabled and s.crf else None
    return {"evaluate": section_inputs(cfg, "evaluate", ["faithfulness"] if cfg.evaluate.faithfulness.enabled else []),
            "segmenter": predict if s.enabled else {"enabled": False}, "crf": crf}


def _segmenter_metrics(cfg: Config) -> dict | None:
    """The segmenter and its GT twin scored on the val split's GT (None when there is no segmenter or no GT)."""
    s, run_dir = cfg.segmenter, cfg.run_path
    if not s.enabled or stage_fingerprint(run_dir, "train_segmenter") is None:
        return None
    val = load_dataset(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    if val is None or not any(x.mask_path for x in val.samples):
        log.warning("evaluate: no GT masks in the val split (data.val_split %r); the segmenter is not scored",
                    cfg.data.val_split)
        return None
    check_mask_sizes(val)
    upper = s.masks == "pseudo" and s.upper_bound and stage_fingerprint(run_dir, "train_segmenter_gt") is not None
    crf = cfg.refine.crf if s.crf else None
    return {"split": cfg.data.val_split,
            **evaluate_segmenters(run_dir, val, resolve_device(cfg.device), s.flip_test, crf, upper,
                                  checked_scales(s.test_scales))}
