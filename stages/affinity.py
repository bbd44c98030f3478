"""Stage 3b (``affinity.enabled``): AffinityNet on the refined labels, then a random walk of ``refine.method``'s
maps -> maps/<method>_rw/, refined again by ``affinity.refiners`` (through the salient-object prior that the refine
stage read, with ``saliency.enabled``) -> refined/<refiner>_rw/, affinity.pt.
It takes minutes, so an interrupted run starts over rather than resuming."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.data import maps_dataset
from pipeline.device import resolve_device
from pipeline.distributed import torchrun_rank
from pipeline.models import load_classifier
from pipeline.refine import SUFFIX, get_refiner, walked_maps
from pipeline.refine.affinity import collect, train_head, walk_maps
from pipeline.refine.runner import refine_split
from pipeline.runfolder import Stage, fingerprint, save_torch, stage_fingerprint
from pipeline.saliency import run_prior
from stages.common import log, refiner_inputs, section_inputs


def run(cfg: Config, force: bool = False) -> None:
    run_dir, a = cfg.run_path, cfg.affinity
    if not a.enabled or torchrun_rank() > 0:
        return
    for name in a.refiners:
        get_refiner(name, "affinity.refiners")
    # the head and the walk: from the label sets of labels_from (each refines refine.method's maps)
    walk = fingerprint(section_inputs(cfg, "affinity", drop=("refiners",)), cfg.seed,
                       [stage_fingerprint(run_dir, "refine", name) for name in a.labels_from])
    parts = {name + SUFFIX: fingerprint(name, refiner_inputs(cfg, [name]), walk) for name in a.refiners}
    stage = Stage(run_dir, "affinity", walk, parts)
    if stage.is_done() and not force:
        log.info("affinity: up to date, skipped")
        return
    walked = run_dir / "maps" / walked_maps(cfg)
    stage.begin(outputs=[walked, *(run_dir / "refined" / (r + SUFFIX) for r in a.refiners)], fresh=True)
    ds, device = maps_dataset(cfg), resolve_device(cfg.device)
    net, ckpt = load_classifier(run_dir / "classifier.pt", device)
    log.info("affinity: labels where %s agree, %d images", " and ".join(a.labels_from), len(ds))
    items = collect(net, ckpt, ds, [run_dir / "refined" / r for r in a.labels_from], a, device)
    head, losses = train_head(items, a, device, cfg.seed)
    save_torch(run_dir / "affinity.pt", {"state_dict": head.state_dict(), "losses": losses})
    walk_maps(head, items, ds, run_dir / "maps" / cfg.refine.method, walked, a, device)
    prior = run_prior(run_dir, ds.classes) if cfg.saliency.enabled else None
    for name in a.refiners:
        refine_split(name, ds, walked, run_dir / "refined" / (name + SUFFIX), cfg.refine, ray=cfg.ray,
                     cache_dir=run_dir / "cache", device=cfg.device, prior=prior)
    stage.finish(images=len(ds), losses=[round(x, 4) for x in losses])
