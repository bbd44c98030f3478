"""Stage 3c: the context-decoupled second round (``pipeline.decouple.run_round``) for the classes the label
statistics bind to a context: cut-outs from the first round's label set that export would take, the first round's
classifier fine-tuned on pasted images (classifier_dc.pt), its maps (maps/<method>_dc/, walked:
maps/<method>_dc_rw/) and their label sets (refined/<refiner>_dc[_rw]/); decouple.json says which classes, their
contexts and the bank. A run whose statistics find no such class does nothing here. An interrupted round resumes
its fine-tuning after the last epoch and redoes the rest."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.decouple import cut_out_source, run_round
from pipeline.device import resolve_device, seed_everything
from pipeline.distributed import torchrun_rank
from pipeline.refine import DECOUPLED, SUFFIX, round_two_sets
from pipeline.runfolder import Stage, fingerprint, stage_fingerprint
from stages.common import log


def run(cfg: Config, force: bool = False) -> None:
    run_dir, method = cfg.run_path, cfg.refine.method
    if torchrun_rank() > 0:
        return
    upstream = [stage_fingerprint(run_dir, s) for s in ("refine", "affinity")]
    fp = fingerprint(cfg.section_hash("decouple", "classifier"), cut_out_source(cfg), upstream)
    stage = Stage(run_dir, "decouple", fp)
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
    stage.finish(**run_round(cfg, resolve_device(cfg.device), fp))
