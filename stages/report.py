"""Stage 7: report.html, one self-contained page of the run (tables, curves, sample grids, stage times)."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.data import maps_dataset
from pipeline.report import build_report, report_path
from pipeline.runfolder import Stage, fingerprint, stage_fingerprint, write_text
from stages.common import log, section_inputs


def _upstream(run_dir) -> dict[str, str | None]:
    """The identities of every finished stage but this one: any rerun stage makes the report stale."""
    names = sorted(p.name.removesuffix(".done.json") for p in run_dir.glob("*.done.json"))
    return {name: stage_fingerprint(run_dir, name) for name in names if name != "report"}


def run(cfg: Config, force: bool = False) -> None:
    run_dir, out = cfg.run_path, report_path(cfg.run_path)
    # what the page shows besides the stages' outputs: the run's name and device, the faithfulness options
    shown = (cfg.name, cfg.device, section_inputs(cfg, "evaluate", ["faithfulness"])["faithfulness"])
    stage = Stage(run_dir, "report", fingerprint(section_inputs(cfg, "report"), shown, _upstream(run_dir)))
    if stage.is_done() and out.exists() and not force:
        log.info("report: up to date, skipped: %s", out)
        return
    ds = maps_dataset(cfg)
    stage.begin(fresh=force)
    write_text(out, build_report(cfg, ds))
    stage.finish(bytes=out.stat().st_size)
    log.info("report: %s (%.0f kB; open it in a browser)", out, out.stat().st_size / 1024)
