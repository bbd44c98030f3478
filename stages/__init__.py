"""One thin entry point per stage: parse config, call the library, write outputs. In run order
(``pipeline.stage_names.STAGE_NAMES``, the one list of the stages' names).

Each function of ``STAGES`` runs ``pipeline.preflight.preflight`` before its stage (the splits on disk, the packages
of that stage and the stages after it), so ``wsss all``, a single stage and a loop over ``STAGES`` from Python fail
at once, before any training, on a missing package or split file."""

import functools
from collections.abc import Callable

from pipeline.config import Config
from pipeline.preflight import preflight
from pipeline.stage_names import STAGE_NAMES
from stages import (
    affinity,
    decouple,
    evaluate,
    export,
    make_maps,
    refine,
    report,
    saliency,
    train_classifier,
    train_segmenter,
)


def _checked(name: str, run: Callable[..., None]) -> Callable[..., None]:
    """The stage ``run`` of ``name``, after the preflight checks."""

    @functools.wraps(run)
    def checked(cfg: Config, force: bool = False) -> None:
        preflight(cfg, name)
        run(cfg, force=force)

    return checked


STAGES = {name: _checked(name, run) for name, run in {
    "saliency": saliency.run,
    "train_classifier": train_classifier.run,
    "make_maps": make_maps.run,
    "refine": refine.run,
    "affinity": affinity.run,
    "decouple": decouple.run,
    "export": export.run,
    "train_segmenter": train_segmenter.run,
    "evaluate": evaluate.run,
    "report": report.run,
}.items()}
if tuple(STAGES) != STAGE_NAMES:
    raise ImportError(f"stages.STAGES {tuple(STAGES)} is not pipeline.stage_names.STAGE_NAMES {STAGE_NAMES}")
