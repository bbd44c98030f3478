"""Run-once visualisations of the classifier, and their registry: made once per run by make_maps, not per image.

A visualisation is ``fn(model, ckpt, png, json, **options)``: ``model`` the classifier (eval mode), ``ckpt``
its checkpoint dict; it writes ``maps/<name>.png`` and then ``maps/<name>.json`` (the json last, so that it
marks the visualisation done) and returns what it wrote to the json. The config names them in
``maps.visualizations``; their options are ``maps.<name>``. ``class_model`` (Simonyan et al. 2014's class model
visualisation, ``pipeline/maps/class_model.py``) is one. The per-image map methods have their own registry
(``pipeline.maps``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.maps import class_model as _class_model  # noqa: F401  (registers class_model)
from pipeline.maps._visualizations import VISUALIZATIONS, Visualization, get_visualization, register_visualization

__all__ = ["VISUALIZATIONS", "Visualization", "get_visualization", "make_visualizations", "register_visualization",
           "visualization_outputs"]


def visualization_outputs(out_root: Path, name: str) -> list[Path]:
    """What visualisation ``name`` writes under ``out_root``: ``<name>.png``, then ``<name>.json``."""
    return [out_root / f"{name}.png", out_root / f"{name}.json"]


def make_visualizations(net: nn.Module, ckpt: dict[str, Any], cfg, out_root: Path,
                        skip_existing: bool = False) -> list[str]:
    """Run each visualisation of ``cfg.visualizations`` (``cfg``: the ``maps`` section) with its options
    ``cfg.<name>``, unless ``skip_existing`` and its json is there; returns the names run now."""
    done = []
    for name in cfg.visualizations:
        outs = visualization_outputs(out_root, name)
        if skip_existing and outs[-1].exists():
            continue
        options = getattr(cfg, name, None)
        get_visualization(name)(net, ckpt, *outs, **(dataclasses.asdict(options) if options is not None else {}))
        done.append(name)
    return done

