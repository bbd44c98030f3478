"""Stage 0 (``saliency.enabled``): the salient-object map of every image the run reads (pipeline/saliency.py,
U²-Net-p) -> saliency/<id>.png. It needs only the images, so it runs before the classifier; an interrupted run
resumes with the images whose map is missing."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.distributed import torchrun_rank
from pipeline.runfolder import Stage, fingerprint
from pipeline.saliency import FOLDER, load_model, run_images, weights_identity, write_maps
from stages.common import dataset_fingerprint, log


def run(cfg: Config, force: bool = False) -> None:
    run_dir, s = cfg.run_path, cfg.saliency
    if not s.enabled or torchrun_rank() > 0:
        return
    ds = run_images(cfg)
    fp = fingerprint(weights_identity(s.weights), dataset_fingerprint(ds))
    stage = Stage(run_dir, "saliency", fp)
    if stage.is_done() and not force:
        log.info("saliency: up to date, skipped")
        return
    resuming = stage.begin(outputs=[run_dir / FOLDER], fresh=force)
    device = resolve_device(cfg.device)
    log.info("saliency: U²-Net-p (%s) on %d images (%s)", s.weights, len(ds), device)
    written = write_maps(load_model(s.weights, device), ds, run_dir / FOLDER, device, s.batch_size,
                         skip_existing=resuming)
    stage.finish(images=len(ds), written=written)
