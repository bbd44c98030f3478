"""The pipeline's stages by name, in run order: the names ``wsss <stage>`` and ``make <stage>`` take and the
run folder's ``<stage>.done.json`` markers carry.

The one list of them. The library reads the names here (it does not import ``stages/``); ``stages/__init__.py``
maps each name to its run function and checks at import that the two agree.
"""

from __future__ import annotations

STAGE_NAMES = ("saliency", "train_classifier", "make_maps", "refine", "affinity", "decouple", "export",
               "train_segmenter", "evaluate", "report")
# The done markers of a stage that writes more than its own: each segmenter is a sub-stage (the GT twin too).
SUB_STAGES = {"train_segmenter": ("train_segmenter", "train_segmenter_gt")}
TRAINING_STAGES = ("train_classifier", "train_segmenter")  # the stages that train data-parallel under torchrun


def done_markers(names: tuple[str, ...] = STAGE_NAMES) -> tuple[str, ...]:
    """The done-marker names (``<marker>.done.json``) of the stages ``names``, in their order, a stage's
    sub-stages in its place."""
    return tuple(marker for name in names for marker in SUB_STAGES.get(name, (name,)))


def upstream_markers(stage: str) -> tuple[str, ...]:
    """The done markers of every stage that runs before ``stage``."""
    return done_markers(STAGE_NAMES[:STAGE_NAMES.index(stage)])
