"""Stage 4: export the chosen refiner's label maps as a VOC-layout pseudo-mask dataset + manifest.json
(which refiner: ``pipeline.export.export_refiner``), then each other format of ``export.formats`` from it into
``exports/<format>/``. The formats are not part of the stage's fingerprint (the segmenter trains on the VOC
export, which they leave alone): adding one writes just that one, and each format's folder records the
fingerprint of the VOC export it came from (``pipeline.export.FORMAT_MARKER``). The manifest gets each image's
confidence (``pipeline.confidence``); masks a person corrected (``<run>/corrections/``, ``wsss import-masks``) are
exported instead of the refined ones, and are an input of the stage. The masks are a part of their own (the
segmenter reads them alone), and ``export.images`` (links or copies) redoes the export but no later stage."""

from __future__ import annotations

from pipeline.confidence import run_confidence
from pipeline.config import Config
from pipeline.data import maps_dataset
from pipeline.export import export_pseudo_masks, export_refiner, formats_to_write, write_formats
from pipeline.refine import label_sets
from pipeline.review import CORRECTIONS, corrections_fingerprint
from pipeline.runfolder import Stage, fingerprint
from stages.common import label_set_identity, log


def run(cfg: Config, force: bool = False) -> None:
    run_dir, e = cfg.run_path, cfg.export
    refined = label_sets(cfg)
    refiner = export_refiner(e.refiner, list(refined))  # checked before anything changes
    sets = {name: label_set_identity(cfg, name) for name in refined}
    # the masks (what the segmenter reads): the chosen set's, or a person's corrections; the manifest's confidence
    # reads every set and the threshold; the images (links or copies) are read by no later stage
    masks = fingerprint(refiner, sets[refiner], corrections_fingerprint(run_dir))
    stage = Stage(run_dir, "export", fingerprint(sets, cfg.refine.threshold.fg), {"masks": masks}, local=e.images)
    voc_done = stage.is_done() and not force
    formats = formats_to_write(run_dir / "exports", e.formats, stage.fp, force=not voc_done)
    if voc_done:  # the masks are current; other formats may be missing (each has its own marker)
        if formats:
            _write_formats(run_dir, formats, e.images, stage.fp)
        else:
            log.info("export: up to date, skipped")
        return
    stage.begin(fresh=force)
    ds = maps_dataset(cfg)
    map_method = refined[refiner]
    confidence = run_confidence(ds, run_dir / "refined", refiner, [r for r in refined if r != refiner],
                                run_dir / "maps" / map_method, cfg.refine.threshold.fg)
    manifest = export_pseudo_masks(ds, run_dir / "refined" / refiner, run_dir / "pseudo_masks", e.images,
                                   provenance={"refiner": refiner, "map_method": map_method},
                                   confidence=confidence, corrections=run_dir / CORRECTIONS)
    log.info("export: %d pseudo-masks (%s on %s) in %s, mean ignore ratio %.1f%%", len(ds), refiner, map_method,
             run_dir / "pseudo_masks", 100 * manifest["summary"]["mean_ignore_ratio"])
    c = manifest["confidence"]
    log.info("export: mean confidence %s%s%s", c["mean"], f", {c['corrected']} corrected" if c["corrected"]
             else "", f"; unreliable classes: {', '.join(c['unreliable'])}" if c["unreliable"] else "")
    _write_formats(run_dir, formats, e.images, stage.fp)
    stage.finish(images=len(list((run_dir / "pseudo_masks" / "SegmentationClass").glob("*.png"))))


def _write_formats(run_dir, formats: list[str], images: str, fp: str) -> None:
    for name, wrote in write_formats(run_dir / "pseudo_masks", run_dir / "exports", formats, images, fp).items():
        log.info("export: %s in %s (%s)", name, run_dir / "exports" / name, ", ".join(f"{v} {k}" for k, v in
                                                                                      wrote.items()))
