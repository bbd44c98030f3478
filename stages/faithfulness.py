"""Evaluate's faithfulness section: the run's maps scored by ``pipeline.metrics.faithfulness`` on the run's
classifier, cached in faithfulness.json (a method is recomputed only when what it reads changed), the mean
curves in plots/faithfulness.png."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, FaithfulnessConfig
from pipeline.data import spread
from pipeline.device import resolve_device
from pipeline.maps.io import load_maps
from pipeline.metrics.faithfulness import PROBE_OPTIONS, score_maps
from pipeline.models import load_classifier
from pipeline.plots import plot_faithfulness_curves
from pipeline.runfolder import fingerprint, read_json, write_json
from stages.common import log


def faithfulness_of_run(cfg: Config, ds, gts: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Every method of ``cfg.maps.methods`` on the run's classifier (CUDA when present), ``ds``: the maps'
    images, ``gts``: their GT masks by id (the energy pointing game where there is one)."""
    run_dir = cfg.run_path
    methods = list(cfg.maps.methods)
    if not methods:
        return {}
    if not (run_dir / "classifier.pt").exists():  # maps made elsewhere: still scored against GT, not this way
        log.warning("evaluate: no %s; the faithfulness of the maps is not scored", run_dir / "classifier.pt")
        return {}
    net, ckpt = load_classifier(run_dir / "classifier.pt", resolve_device(cfg.device))
    classifier_fp = hashlib.sha256((run_dir / "classifier.pt").read_bytes()).hexdigest()[:16]
    results = cached_scores(net, ckpt, ds, gts, run_dir / "maps", methods, cfg.evaluate.faithfulness,
                            run_dir / "faithfulness.json", classifier_fp)
    plot_faithfulness_curves(results, run_dir / "plots" / "faithfulness.png")
    log.info("evaluate: faithfulness (%s)\n%s", run_dir / "faithfulness.json", format_faithfulness(results))
    return results


def cached_scores(model, ckpt: dict[str, Any], ds, gts: dict[str, np.ndarray], maps_root: Path, methods: list[str],
                  cfg: FaithfulnessConfig, cache_path: Path, classifier_fp: str) -> dict[str, dict[str, Any]]:
    """``score_maps`` of each method on ``cfg.limit`` images of ``ds`` spread over it. ``cache_path`` keeps each
    method's result with a fingerprint of the classifier (``classifier_fp``), the options, the images, their GT
    masks and the maps' values: a method whose fingerprint is unchanged is not recomputed."""
    samples = spread(list(ds.samples), cfg.limit)
    options = {k: getattr(cfg, k) for k in PROBE_OPTIONS}
    ids = [s.id for s in samples]
    gt_fp = _digest(*[gts[i] for i in ids if i in gts])
    fps = {}
    for m in methods:
        digests = [_digest(*load_maps(maps_root / m / f"{i}.npz", ds.classes)) for i in ids]
        fps[m] = fingerprint(classifier_fp, options, ids, gt_fp, digests)
    cache = read_json(cache_path) if cache_path.exists() else {}
    cached = {m: cache[m] for m in methods if isinstance(cache.get(m), dict) and cache[m].get("fingerprint") == fps[m]}
    todo = [m for m in methods if m not in cached]
    if todo:
        for m, summary in score_maps(model, ckpt, ds, samples, gts, maps_root, todo, cfg).items():
            cached[m] = {"fingerprint": fps[m], **summary}
        write_json(cache_path, {m: cached[m] for m in methods})
    return {m: {k: v for k, v in cached[m].items() if k != "fingerprint"} for m in methods}


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def format_faithfulness(results: dict[str, dict[str, Any]]) -> str:
    """A small text table of the faithfulness results (what evaluate logs)."""
    width = max([len(m) for m in results] + [6])
    lines = [f"{'':{width}}  avg drop  incr conf  deletion  insertion  energy PG  pairs"]
    for m, r in results.items():
        cells = [f"{r[k]:{w}.{d}f}" if r.get(k) is not None else f"{'-':>{w}}" for k, w, d in
                 (("average_drop", 7, 1), ("increase_in_confidence", 8, 1), ("deletion_auc", 8, 3),
                  ("insertion_auc", 9, 3), ("energy_pointing_game", 9, 3))]
        lines.append(f"{m:{width}}  {cells[0]}%  {cells[1]}%  {'  '.join(cells[2:])}  {r.get('pairs', 0):5d}")
    return "\n".join(lines)
