"""Stage 2: class maps of every configured method -> maps/<method>/<id>.npz (multi-scale + flip);
then the run-once visualisations (maps.visualizations: class_model) -> maps/<name>.png + .json.
``maps.executor: ray``: the maps on Ray actors. Under torchrun, rank 0 alone runs it."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.data import maps_dataset
from pipeline.device import resolve_device
from pipeline.distributed import torchrun_rank
from pipeline.errors import UserError
from pipeline.executors import executor_session
from pipeline.maps import get_map_method
from pipeline.maps.generate import generate_maps
from pipeline.maps.visualize import get_visualization, make_visualizations, visualization_outputs
from pipeline.models import load_classifier
from pipeline.runfolder import Stage, fingerprint, stage_fingerprint
from stages.common import data_inputs, dataset_fingerprint, log, map_inputs, section_inputs


def run(cfg: Config, force: bool = False) -> None:
    run_dir, m = cfg.run_path, cfg.maps
    if torchrun_rank() > 0:
        return  # one process makes the maps (maps.executor: ray spreads them over machines)
    for name in m.methods:
        get_map_method(name)
    for name in m.visualizations:
        get_visualization(name)
    ds = maps_dataset(cfg)
    shared = (data_inputs(cfg), stage_fingerprint(run_dir, "train_classifier"), dataset_fingerprint(ds))
    # each method's maps are a part: refine reads those of refine.method alone
    parts = {name: fingerprint(name, map_inputs(cfg, name), *shared) for name in m.methods}
    visualizations = {name: section_inputs(cfg, "maps", [name]).get(name) for name in m.visualizations}
    stage = Stage(run_dir, "make_maps", fingerprint(visualizations, *shared), parts)
    if stage.is_done() and not force:
        log.info("make_maps: up to date, skipped")
        return
    device = resolve_device(cfg.device)
    net, ckpt = load_classifier(run_dir / "classifier.pt", device)
    if ckpt["classes"] != ds.classes:
        raise UserError(f"{run_dir / 'classifier.pt'}: trained on other classes than {cfg.data.root} has; "
                        "rerun train_classifier with --force")
    outputs = [run_dir / "maps" / name for name in m.methods]
    outputs += [p for name in m.visualizations for p in visualization_outputs(run_dir / "maps", name)]
    with executor_session(m.executor, cfg.ray, "maps.executor"):
        resuming = stage.begin(outputs=outputs, fresh=force)
        log.info("make_maps: %s on %d %s images, scales %s%s%s", ", ".join(m.methods + m.visualizations), len(ds),
                 m.split, m.scales, " + flip" if m.flip else "", " (Ray actors)" if m.executor == "ray" else "")
        n = generate_maps(net, ckpt, ds, m, run_dir / "maps", device, skip_existing=resuming, ray=cfg.ray,
                          ckpt_path=run_dir / "classifier.pt", device_name=cfg.device)
        make_visualizations(net, ckpt, m, run_dir / "maps", skip_existing=resuming)
    stage.finish(images=len(ds), computed=n)
