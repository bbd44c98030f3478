"""Stage 4: export the chosen refiner's label maps as a VOC-layout pseudo-mask dataset + manifest.json
(which refiner: ``pipeline.export.export_refiner``)."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.export import export_pseudo_masks, export_refiner
from pipeline.refine import label_sets
from pipeline.runfolder import Stage, fingerprint, stage_fingerprint
from stages.common import log, maps_dataset


def run(cfg: Config, force: bool = False) -> None:
    run_dir, e = cfg.run_path, cfg.export
    refined = label_sets(cfg)
    refiner = export_refiner(e.refiner, list(refined))  # checked before anything changes
    walk = [stage_fingerprint(run_dir, "affinity")] if cfg.affinity.enabled else []
    fp = fingerprint(cfg.section_hash("export"), stage_fingerprint(run_dir, "refine"), *walk,
                     stage_fingerprint(run_dir, "decouple"))
    stage = Stage(run_dir, "export", fp)
    if stage.is_done() and not force:
        log.info("export: up to date, skipped")
        return
    stage.begin(fresh=force)

    ds = maps_dataset(cfg)
    map_method = refined[refiner]
    manifest = export_pseudo_masks(ds, run_dir / "refined" / refiner, run_dir / "pseudo_masks", e.images,
                                   provenance={"refiner": refiner, "map_method": map_method})
    log.info("export: %d pseudo-masks (%s on %s) in %s, mean ignore ratio %.1f%%", len(ds), refiner, map_method,
             run_dir / "pseudo_masks", 100 * manifest["summary"]["mean_ignore_ratio"])
    stage.finish(images=len(ds))
