"""Stage 4: export the chosen refiner's label maps as a VOC-layout pseudo-mask dataset + manifest.json."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.export import export_pseudo_masks
from pipeline.refine import SUFFIX, label_sets
from pipeline.runfolder import Stage, fingerprint, stage_fingerprint
from stages.common import log, maps_dataset

# Best first, as measured on MSRC-21 (train and val) and the synthetic set; see the README's Refinement table.
# A refiner on the maps after the affinity random walk (<refiner>_rw) beats the same refiner on the raw maps.
REFINER_PREFERENCE = ("graphcut", "crf", "threshold")


def export_refiner(name: str, refiners: list[str]) -> str:
    """The refiner whose masks are exported: ``name``, or with ``auto`` the most preferred one that ran."""
    if name == "auto":
        preference = [r + SUFFIX for r in REFINER_PREFERENCE] + list(REFINER_PREFERENCE)
        ran = [r for r in preference if r in refiners] or refiners
        if not ran:
            raise ConfigError("config key 'refine.refiners' is empty: there is nothing to export")
        return ran[0]
    _check_refined("export.refiner", name, refiners)
    return name


def agreeing_refiners(names: list[str], refiner: str, refiners: list[str]) -> list[str]:
    """The refiners of ``export.agree_with`` other than the exported one; each must be among refine.refiners."""
    for name in names:
        _check_refined("export.agree_with", name, refiners)
    return [n for n in dict.fromkeys(names) if n != refiner]


def _check_refined(key: str, name: str, refiners: list[str]) -> None:
    if name not in refiners:
        raise ConfigError(f"config key '{key}': {name!r} is not among the refined label sets {refiners} "
                          "(refine.refiners, and <refiner>_rw for affinity.refiners when affinity is on)")


def run(cfg: Config, force: bool = False) -> None:
    run_dir, e = cfg.run_path, cfg.export
    refined = label_sets(cfg)
    refiner = export_refiner(e.refiner, list(refined))
    agree = agreeing_refiners(e.agree_with, refiner, list(refined))  # both checked before anything changes
    walk = [stage_fingerprint(run_dir, "affinity")] if cfg.affinity.enabled else []
    fp = fingerprint(cfg.section_hash("export"), stage_fingerprint(run_dir, "refine"), *walk)
    stage = Stage(run_dir, "export", fp)
    if stage.is_done() and not force:
        log.info("export: up to date, skipped")
        return
    stage.begin(fresh=force)

    ds = maps_dataset(cfg)
    map_method = refined[refiner]
    manifest = export_pseudo_masks(ds, run_dir / "refined" / refiner, run_dir / "pseudo_masks", e.images,
                                   provenance={"refiner": refiner, "map_method": map_method,
                                               "agree_with": agree},
                                   agree_dirs=tuple(run_dir / "refined" / r for r in agree))
    log.info("export: %d pseudo-masks (%s on %s%s) in %s, mean ignore ratio %.1f%%", len(ds), refiner,
             map_method, f", kept where {' and '.join(agree)} agree" if agree else "",
             run_dir / "pseudo_masks", 100 * manifest["summary"]["mean_ignore_ratio"])
    stage.finish(images=len(ds))
