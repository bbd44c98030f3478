"""What every stage shares: the logger and the fingerprints of the inputs the stages read.

A stage's fingerprint holds every input it reads and nothing it does not (pipeline/runfolder.py): the config keys
it reads, here as ``section_inputs``; the files it reads (``dataset_fingerprint``, ``masks_fingerprint``); the
outputs of earlier stages, as their recorded identities (``stage_fingerprint``; ``label_set_identity`` for one
label set).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.config import EXECUTION_KEYS, Config
from pipeline.data import SegDataset
from pipeline.refine import round_two_sets
from pipeline.runfolder import files_fingerprint, fingerprint, stage_fingerprint

log = logging.getLogger("stages")

# Keys that choose how a stage runs, not what it writes: pipeline.config's, and the training stages' data-loader
# workers (each sample is augmented from a seed of its own index and epoch, so any number of workers gives the
# same batches; tests/test_staleness.py checks the weights).
EXECUTION = {**EXECUTION_KEYS, "classifier": ("workers",), "segmenter": ("workers",)}


def _options(obj: Any) -> Any:
    """A config dataclass as a dict; a string that names an existing file (a weights file, a checkpoint) as the
    string and the file's fingerprint, so that new contents at the same path count as a change."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _options(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, str) and obj and _is_file(obj):
        return [obj, files_fingerprint([obj])]
    return obj


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # not a path at all (too long, a NUL byte)
        return False


def section_inputs(cfg: Config, section: str, chosen: Iterable[str] = (), drop: Iterable[str] = ()) -> dict:
    """Config section ``section`` as the inputs of a stage that reads it: without the keys that only choose where
    it runs (``EXECUTION``) and the keys of ``drop``; of its option sub-sections, which are bound by name
    (``classifier.<model>``, ``maps.<method>``, ``data.<kind>``), only those named in ``chosen``."""
    obj, leave_out, chosen = getattr(cfg, section), {*EXECUTION.get(section, ()), *drop}, set(chosen)
    return {f.name: _options(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in leave_out
            and (f.name in chosen or not dataclasses.is_dataclass(getattr(obj, f.name)))}


def data_inputs(cfg: Config) -> dict:
    """The ``data`` section as a dataset reader reads it: the options of its ``kind`` only (``val_fraction`` is the
    folder layout's)."""
    return section_inputs(cfg, "data", [cfg.data.kind], () if cfg.data.kind == "folder" else ("val_fraction",))


def classifier_inputs(cfg: Config, drop: Iterable[str] = ()) -> dict:
    """The ``classifier`` section with the options of its ``model`` only."""
    return section_inputs(cfg, "classifier", [cfg.classifier.model], drop)


def map_inputs(cfg: Config, method: str) -> dict:
    """The ``maps`` keys that method ``method``'s maps are made with: its options (``maps.<method>``), the scales,
    the flip, the images (``split``, ``limit``) and the folded BatchNorm."""
    return section_inputs(cfg, "maps", [method], ("methods", "visualizations"))


def refiner_inputs(cfg: Config, names: Iterable[str]) -> dict:
    """The options each refiner of ``names`` reads: ``refine.<name>``, and those of the refiner its ``fallback``
    option names (sam labels what no mask claims with that refiner), the same way."""
    out: dict[str, Any] = {}
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if name in out:
            continue
        options = getattr(cfg.refine, name, None)
        out[name] = _options(options) if dataclasses.is_dataclass(options) else None
        if isinstance(getattr(options, "fallback", None), str):
            todo.append(options.fallback)
    return out


def label_set_identity(cfg: Config, name: str) -> str | None:
    """The identity of the refined label set ``name`` (refined/<name>/) of the run: the part of the stage that
    made it (refine: each of refine.refiners; affinity: each of affinity.refiners on the walked maps), or the
    decouple stage's identity for a set of its round (one round makes them all)."""
    run = cfg.run_path
    if name in cfg.refine.refiners:
        return stage_fingerprint(run, "refine", name)
    if name in round_two_sets(cfg):
        return stage_fingerprint(run, "decouple")
    return stage_fingerprint(run, "affinity", name)


def dataset_fingerprint(ds: SegDataset) -> str:
    """Classes, image-level labels and image files: what the classifier and the maps are made from."""
    return fingerprint(ds.classes, ds.background, [(s.id, s.labels) for s in ds.samples],
                       files_fingerprint(s.image_path for s in ds.samples))


def masks_fingerprint(ds: SegDataset) -> str:
    """The GT mask files, read by evaluate and by the segmenter's GT twin (train_segmenter_gt)."""
    return files_fingerprint(s.mask_path for s in ds.samples if s.mask_path)
