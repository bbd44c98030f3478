"""Stage 3c: the context-decoupled second round (pipeline/decouple.py), for the classes the label statistics bind to
a context. Cut-outs from the first round's exported label set -> the first round's classifier fine-tuned on
pasted and context-only images (classifier_dc.pt) -> maps/<method>_dc/ -> with the affinity stage, the walk with
its affinity head (maps/<method>_dc_rw/) and affinity.refiners (refined/<refiner>_dc_rw/), else refine.refiners
(refined/<refiner>_dc/). decouple.json says which classes, their contexts and the bank. A run whose statistics
find no such class does nothing here. An interrupted round resumes its fine-tuning after the last epoch and
redoes the rest."""

from __future__ import annotations

import dataclasses

from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.data.transforms import classifier_train_transform
from pipeline.decouple import DecoupledImages, build_bank
from pipeline.device import resolve_device, seed_everything
from pipeline.distributed import torchrun_rank
from pipeline.export import export_refiner
from pipeline.label_stats import context_of, label_stats
from pipeline.maps.generate import generate_maps
from pipeline.models import load_classifier
from pipeline.refine import DECOUPLED, SUFFIX, label_sets, round_two_sets
from pipeline.refine.affinity import collect, load_head, walk_maps
from pipeline.refine.runner import refine_split
from pipeline.runfolder import Stage, fingerprint, save_torch, stage_fingerprint, write_json
from pipeline.train import train_classifier
from stages.common import log, maps_dataset


def run(cfg: Config, force: bool = False) -> None:
    run_dir, d = cfg.run_path, cfg.decouple
    if torchrun_rank() > 0:
        return
    upstream = [stage_fingerprint(run_dir, s) for s in ("refine", "affinity")]
    fp = fingerprint(cfg.section_hash("decouple", "classifier"), upstream)
    stage = Stage(run_dir, "decouple", fp)
    if stage.is_done() and not force:
        log.info("decouple: up to date, skipped")
        return
    method = cfg.refine.method
    outputs = [run_dir / "maps" / (method + DECOUPLED), run_dir / "maps" / (method + DECOUPLED + SUFFIX),
               *(run_dir / "refined" / name for name in round_two_sets(cfg)), run_dir / "decouple.json"]
    stage.begin(outputs=outputs, fresh=True)  # the fine-tuning resumes from its own resume file
    train_ds = load_dataset(cfg.data, cfg.data.train_split)
    stats = label_stats(train_ds.classes, [s.labels for s in train_ds.samples])
    index = {c: i for i, c in enumerate(train_ds.classes)}
    context = {index[a]: [index[b] for b in bs] for a, bs in context_of(stats, d.context).items()}
    if not d.enabled or not context:
        log.info("decouple: %s", "off (decouple.enabled)" if not d.enabled else
                 f"no class is bound to a context (P(b | a) >= {d.context}): no second round")
        stage.finish(classes=[])
        return

    sets = label_sets(cfg, round_two=False)  # the first round's: the cut-outs come from the one export would take
    source = export_refiner(cfg.export.refiner if cfg.export.refiner in sets else "auto", list(sets))
    mapped = maps_dataset(cfg)
    have = {s.id for s in mapped.samples}
    train_ds.samples = [s for s in train_ds.samples if s.id in have]  # the bank needs their maps and labels
    names = train_ds.classes
    log.info("decouple: %s (contexts %s); cut-outs from %s", ", ".join(names[c] for c in context),
             "; ".join(f"{names[a]}: {', '.join(names[b] for b in bs)}" for a, bs in context.items()), source)
    bank = build_bank(train_ds, run_dir / "refined" / source, run_dir / "maps" / sets[source], context, cfg.seed)
    write_json(run_dir / "decouple.json", {
        "classes": {names[a]: [names[b] for b in bs] for a, bs in context.items()}, "source": source,
        "bank": bank.summary(names), "context_crops": len(bank.crops)})
    log.info("decouple: %d cut-outs, %d context crops", len(bank.cut_outs), len(bank.crops))

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    net, ckpt = load_classifier(run_dir / "classifier.pt", device)
    net.requires_grad_(True)  # loaded for inference: every weight learns again
    c = dataclasses.replace(cfg.classifier, epochs=d.epochs)
    val_ds = load_dataset(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    items = DecoupledImages(train_ds, bank, context, classifier_train_transform(c.input_size, ckpt["mean"],
                                                                                 ckpt["std"]), d.paste_prob, cfg.seed)
    resume = run_dir / "classifier_dc.resume.pt"
    history = train_classifier(net, list(net.backbone.parameters()), c, train_ds, val_ds, ckpt["mean"], ckpt["std"],
                               device, cfg.seed, resume, fp, train=items)
    save_torch(run_dir / "classifier_dc.pt", {**ckpt, "state_dict": {k: v.detach().cpu()
                                                                     for k, v in net.state_dict().items()}})
    write_json(run_dir / "decouple_log.json", history)

    maps_cfg = dataclasses.replace(cfg.maps, methods=[method])
    generate_maps(net, ckpt, mapped, maps_cfg, run_dir / "maps", device, suffix=DECOUPLED)
    maps_dir = run_dir / "maps" / (method + DECOUPLED)
    refiners = cfg.refine.refiners
    if cfg.affinity.enabled:  # the first round's affinity head walks the new maps, on the first round's features
        first, _ = load_classifier(run_dir / "classifier.pt", device)
        a = cfg.affinity
        feats = collect(first, ckpt, mapped, [run_dir / "refined" / r for r in a.labels_from], a, device)
        walked = run_dir / "maps" / (method + DECOUPLED + SUFFIX)
        walk_maps(load_head(run_dir / "affinity.pt", feats, a, device), feats, mapped, maps_dir, walked, a, device)
        maps_dir, refiners = walked, a.refiners
    for name, out in zip(refiners, round_two_sets(cfg), strict=True):
        refine_split(name, mapped, maps_dir, run_dir / "refined" / out, cfg.refine, ray=cfg.ray,
                     cache_dir=run_dir / "cache", device=cfg.device)
    resume.unlink(missing_ok=True)
    stage.finish(classes=[names[a] for a in context], cut_outs=len(bank.cut_outs), context_crops=len(bank.crops),
                 val_map=history[-1].get("val_map") if history else None)
