"""Stage 3c: the context-decoupled second round (``pipeline.decouple.run_round``) for the classes the label
statistics bind to a context: cut-outs from the first round's label set that export would take, the first round's
classifier fine-tuned on pasted images (classifier_dc.pt), its maps (maps/<method>_dc/, walked:
maps/<method>_dc_rw/) and their label sets (refined/<refiner>_dc[_rw]/); decouple.json says which classes, their
contexts and the bank. A run whose statistics find no such class does nothing here. An interrupted round resumes
its fine-tuning after the last epoch and redoes the rest."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.decouple import cut_out_source, round_targets, run_round
from pipeline.device import resolve_device, seed_everything
from pipeline.distributed import torchrun_rank
from pipeline.refine import DECOUPLED, SUFFIX, round_two_sets
from pipeline.runfolder import Stage, fingerprint, stage_fingerprint
from stages.common import classifier_inputs, label_set_identity, log, section_inputs


def run(cfg: Config, force: bool = False) -> None:
    run_dir, method = cfg.run_path, cfg.refine.method
    if torchrun_rank() > 0:
        return
    stage = Stage(run_dir, "decouple", _fingerprint(cfg))
    if stage.is_done() and not force:
        log.info("decouple: up to date, skipped")
        return
    outputs = [run_dir / "maps" / (method + DECOUPLED), run_dir / "maps" / (method + DECOUPLED + SUFFIX),
               *(run_dir / "refined" / name for name in round_two_sets(cfg)), run_dir / "decouple.json"]
    stage.begin(outputs=outputs, fresh=True)  # the fine-tuning resumes from its own resume file
    if not cfg.decouple.enabled:
        log.info("decouple: off (decouple.enabled)")
        stage.finish(classes=[])
        return
    seed_everything(cfg.seed)
    stage.finish(**run_round(cfg, resolve_device(cfg.device), stage.fp))


def _fingerprint(cfg: Config) -> str:
    """What the round reads. Without a class bound to a context (or with the stage off) it makes nothing, whatever
    its options: one fingerprint for all such runs, so that a change to them leaves the later stages alone. Else:
    its options and the classifier's it fine-tunes with (not the epochs), the label set the cut-outs come from and
    its maps, and what the round's maps are refined with, the affinity stage's head and refiners or refine's."""
    if not cfg.decouple.enabled or not round_targets(cfg, load_dataset(cfg.data, cfg.data.train_split)):
        return fingerprint("no round")
    source, run_dir = cut_out_source(cfg), cfg.run_path
    refined = stage_fingerprint(run_dir, "affinity") if cfg.affinity.enabled else stage_fingerprint(run_dir, "refine")
    return fingerprint(section_inputs(cfg, "decouple"), classifier_inputs(cfg, drop=("epochs",)), source,
                       label_set_identity(cfg, source), refined)
