"""Stage 1: train the classifier (CAM or ACoL) on image-level labels -> classifier.pt, train_log.json, curves.

Under ``torchrun --nproc_per_node N`` every process trains its share of each batch (DDP); rank 0 alone
writes the run folder."""

from __future__ import annotations

import dataclasses

from pipeline.config import Config
from pipeline.data import load_dataset, prepare_data
from pipeline.device import seed_everything
from pipeline.distributed import DistContext, distributed
from pipeline.label_stats import label_stats, label_warnings
from pipeline.models import build_classifier, classifier_state
from pipeline.plots import plot_training_curves
from pipeline.runfolder import Stage, fingerprint, save_torch, write_json
from pipeline.train import train_classifier
from stages.common import classifier_inputs, data_inputs, dataset_fingerprint, log


def run(cfg: Config, force: bool = False) -> None:
    with distributed(cfg.device) as ctx:
        _run(cfg, force, ctx)


def _run(cfg: Config, force: bool, ctx: DistContext) -> None:
    run_dir, c = cfg.run_path, cfg.classifier
    if ctx.is_main:
        prepare_data(cfg.data)  # a synthetic set is generated once, by rank 0
    ctx.barrier()  # and every process has written config.yaml before rank 0 clears temp files in begin()
    train_ds = load_dataset(cfg.data, cfg.data.train_split)
    val_ds = load_dataset(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    if ctx.is_main:  # what the labels cannot teach, said before any training
        stats = label_stats(train_ds.classes, [s.labels for s in train_ds.samples])
        warnings = label_warnings(stats)
        write_json(run_dir / "label_stats.json", {**stats.to_json(), "warnings": [w.to_json() for w in warnings]})
        for w in warnings:
            log.warning("labels: %s", w.message)
    fp = fingerprint(data_inputs(cfg), classifier_inputs(cfg), cfg.seed, dataset_fingerprint(train_ds),
                     dataset_fingerprint(val_ds) if val_ds else None)
    stage = Stage(run_dir, "train_classifier", fp)
    if stage.is_done() and not force:
        log.info("train_classifier: up to date, skipped")
        return
    resume_path = run_dir / "classifier.resume.pt"
    if ctx.is_main:
        stage.begin(outputs=[resume_path], fresh=force)
    ctx.barrier()  # the others read the resume file once rank 0 has kept or removed it

    seed_everything(cfg.seed)
    device = ctx.device
    options = getattr(c, c.model, None)  # classifier.<model>, the model's options if any (acol)
    net, backbone = build_classifier(c.model, c.backbone, c.pretrained, train_ds.num_classes,
                                     dataclasses.asdict(options) if options is not None else None,
                                     fast_cpu_convs=c.fast_cpu_convs)
    log.info("train_classifier: %s/%s on %d images (%s%s), %d epochs", c.model, c.backbone, len(train_ds),
             device, f" x {ctx.world_size} processes" if ctx.distributed else "", c.epochs)
    history = train_classifier(net, list(net.backbone.parameters()), c, train_ds, val_ds, backbone.mean,
                               backbone.std, device, cfg.seed, resume_path, fp, ctx=ctx)
    if not ctx.is_main:
        return
    save_torch(run_dir / "classifier.pt", classifier_state(
        net, model=c.model, backbone=backbone, backbone_name=c.backbone, classes=train_ds.classes,
        background=train_ds.background, input_size=c.input_size))
    write_json(run_dir / "train_log.json", history)
    plot_training_curves(history, run_dir / "plots" / "classifier.png")
    stage.finish(val_map=history[-1].get("val_map") if history else None)
    resume_path.unlink(missing_ok=True)
