"""Stage 3: refine the maps of ``refine.method`` with every configured refiner -> refined/<refiner>/.
With ``saliency.enabled`` it first reads which classes are things and which stuff from those maps against the
salient-object maps (things.json), and every refiner takes the maps through that prior.
``refine.executor: ray``: on Ray tasks. Under torchrun, rank 0 alone runs it."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.data import maps_dataset
from pipeline.distributed import torchrun_rank
from pipeline.executors import executor_session
from pipeline.refine import get_refiner
from pipeline.refine.runner import refine_split, resolve_workers
from pipeline.runfolder import Stage, fingerprint, stage_fingerprint
from pipeline.saliency import read_prior
from stages.common import log, refiner_inputs


def run(cfg: Config, force: bool = False) -> None:
    run_dir, r = cfg.run_path, cfg.refine
    if torchrun_rank() > 0:
        return  # one process refines (refine.executor: ray spreads the images over machines)
    for name in r.refiners:
        get_refiner(name)
    maps = stage_fingerprint(run_dir, "make_maps", r.method)
    # the salient-object maps: every label set goes through their prior
    salient = [stage_fingerprint(run_dir, "saliency")] if cfg.saliency.enabled else []
    # each refiner's label set is a part: what affinity, decouple and export read of them differs
    parts = {name: fingerprint(name, r.method, refiner_inputs(cfg, [name]), maps, *salient) for name in r.refiners}
    stage = Stage(run_dir, "refine", fingerprint(r.method, maps, *salient), parts)
    if stage.is_done() and not force:
        log.info("refine: up to date, skipped")
        return
    with executor_session(r.executor, cfg.ray, "refine.executor"):  # one Ray session for every refiner
        resuming = stage.begin(outputs=[run_dir / "refined" / name for name in r.refiners], fresh=force)
        ds = maps_dataset(cfg)
        # which classes are things, read from the maps against the salient objects (things.json)
        prior = read_prior(ds, run_dir / "maps" / r.method, run_dir) if cfg.saliency.enabled else None
        log.info("refine: %s on %s maps, %d images, %s", ", ".join(r.refiners), r.method, len(ds),
                 "Ray tasks" if r.executor == "ray" else f"{resolve_workers(r.workers)} workers")
        for name in r.refiners:
            refine_split(name, ds, run_dir / "maps" / r.method, run_dir / "refined" / name, r,
                         skip_existing=resuming, ray=cfg.ray, cache_dir=run_dir / "cache", device=cfg.device,
                         prior=prior)
    stage.finish(images=len(ds))
