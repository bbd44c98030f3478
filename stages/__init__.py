"""One thin entry point per stage: parse config, call the library, write outputs. In run order
(``pipeline.stage_names.STAGE_NAMES``, the one list of the stages' names)."""

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

STAGES = {
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
}
if tuple(STAGES) != STAGE_NAMES:
    raise ImportError(f"stages.STAGES {tuple(STAGES)} is not pipeline.stage_names.STAGE_NAMES {STAGE_NAMES}")
