"""Stage 5: train the segmenter on the exported pseudo-masks -> segmenter.pt, segmenter_log.json, curves;
on a dataset with GT masks also its GT twin (the same segmenter on the same images' GT) -> segmenter_gt.pt.

Each model is its own sub-stage (``train_segmenter``, ``train_segmenter_gt``): new pseudo-masks retrain the
first and leave the twin alone. ``segmenter.masks: gt`` trains the first on GT (then there is no twin).
Under ``torchrun --nproc_per_node N`` every process trains its share of each batch (DDP); rank 0 alone
writes the run folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pipeline.config import Config
from pipeline.data import Sample, SegDataset, load_dataset, maps_dataset
from pipeline.data.voc import read_voc
from pipeline.device import seed_everything
from pipeline.distributed import DistContext, distributed
from pipeline.errors import UserError
from pipeline.models.segmenter import build_segmenter, segmenter_state
from pipeline.plots import plot_training_curves
from pipeline.runfolder import Stage, fingerprint, save_torch, stage_fingerprint, write_json
from pipeline.segmenter.train import labelled_samples, train_segmenter
from stages.common import data_inputs, dataset_fingerprint, log, masks_fingerprint, section_inputs

# Keys that change how a trained segmenter is used or whether it runs, not its weights.
NOT_TRAINING = ("enabled", "upper_bound", "crf", "flip_test", "test_scales")


def _pseudo_masks(cfg: Config, ds: SegDataset) -> Callable[[], list[Sample]]:
    root = cfg.run_path / "pseudo_masks"
    if stage_fingerprint(cfg.run_path, "export") is None:
        raise UserError(f"{root}: no exported pseudo-masks (run the export stage first, or set segmenter.masks: gt)")
    # the images the maps were made from, not the export's JPEG copies of the non-JPEG ones: the same pixels
    sources = {x.id: x.image_path for x in ds.samples}
    return lambda: [dataclasses.replace(x, image_path=sources.get(x.id, x.image_path)) for x in
                    labelled_samples(read_voc(root, "train", ds.background), "pseudo-masks")]


def run(cfg: Config, force: bool = False) -> None:
    if not cfg.segmenter.enabled:
        log.info("train_segmenter: skipped (segmenter.enabled is false)")
        return
    with distributed(cfg.device) as ctx:
        _run(cfg, force, ctx)


def _run(cfg: Config, force: bool, ctx: DistContext) -> None:
    s = cfg.segmenter
    ds = maps_dataset(cfg)  # the images that have pseudo-masks, and whose GT the twin trains on
    val = load_dataset(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    training = section_inputs(cfg, "segmenter", drop=NOT_TRAINING)
    common = (training, data_inputs(cfg), cfg.seed, (dataset_fingerprint(val), masks_fingerprint(val)) if val else None)
    gt = (lambda: labelled_samples(ds, "GT masks (segmenter.masks: gt)"),
          fingerprint(*common, "gt", dataset_fingerprint(ds), masks_fingerprint(ds)))
    if s.masks == "gt":
        _train(cfg, "segmenter", *gt, ds, val, "gt", force, ctx)
        return
    # of the export, the masks alone: the images are read from the dataset (_pseudo_masks)
    masks = stage_fingerprint(cfg.run_path, "export", "masks")
    _train(cfg, "segmenter", _pseudo_masks(cfg, ds), fingerprint(*common, masks), ds, val, "pseudo", force, ctx)
    if not s.upper_bound:
        return
    if all(x.mask_path for x in ds.samples):
        _train(cfg, "segmenter_gt", *gt, ds, val, "gt", force, ctx)
    else:
        log.warning("train_segmenter: %s has no GT masks for every %s image; no upper bound (GT twin) trained",
                    cfg.data.root, cfg.maps.split)


def _train(cfg: Config, name: str, samples: Callable[[], list[Sample]], fp: str, ds: SegDataset,
           val: SegDataset | None, masks: str, force: bool, ctx: DistContext) -> None:
    run_dir, s = cfg.run_path, cfg.segmenter
    stage = Stage(run_dir, f"train_{name}", fp)
    if stage.is_done() and not force:
        log.info("train_%s: up to date, skipped", name)
        return
    resume_path = run_dir / f"{name}.resume.pt"
    if ctx.is_main:
        stage.begin(outputs=[resume_path], fresh=force)
    ctx.barrier()  # the others read the resume file once rank 0 has kept or removed it

    seed_everything(cfg.seed)
    device = ctx.device
    train_samples = samples()
    net, backbone = build_segmenter(s.backbone, s.pretrained, ds.num_labels, s.channels, s.atrous_rates,
                                    s.output_stride, s.frozen_stages, s.fast_cpu_convs)
    info = {"input_size": s.input_size, "mean": list(backbone.mean), "std": list(backbone.std),
            "classes": ds.classes, "background": ds.background}
    log.info("train_%s: deeplabv3/%s on %d images with %s masks (%s%s), %d epochs", name, s.backbone,
             len(train_samples), masks, device, f" x {ctx.world_size} processes" if ctx.distributed else "",
             s.epochs)
    history = train_segmenter(net, list(net.backbone.parameters()), info, s, train_samples, val, device, cfg.seed,
                              resume_path, fp, name, ctx)
    if not ctx.is_main:
        return

    save_torch(run_dir / f"{name}.pt", segmenter_state(
        net, backbone=backbone, backbone_name=s.backbone, classes=ds.classes, background=ds.background,
        channels=s.channels, atrous_rates=s.atrous_rates, input_size=s.input_size, masks=masks))
    write_json(run_dir / f"{name}_log.json", history)
    plot_training_curves(history, run_dir / "plots" / f"{name}.png", title=f"{name} ({masks} masks)",
                         loss_label="pixel CE loss", metric=("val_miou", "val mIoU"))
    stage.finish(masks=masks, val_miou=history[-1].get("val_miou") if history else None)
    resume_path.unlink(missing_ok=True)
