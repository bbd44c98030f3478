"""Models: backbones by name, the classifiers (CAM, ACoL; ``Classifier`` is their interface), and their checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError, first_line
from pipeline.models.acol_net import ACoLNet
from pipeline.models.backbones import BACKBONES, Backbone, create_backbone
from pipeline.models.cam_net import CAMNet
from pipeline.models.classifier import Classifier

__all__ = ["ACoLNet", "BACKBONES", "Backbone", "CAMNet", "Classifier", "build_classifier", "load_classifier",
           "classifier_state"]

MODELS: dict[str, type[Classifier]] = {"cam": CAMNet, "acol": ACoLNet}


def build_classifier(model: str, backbone: str, pretrained: str, num_classes: int,
                     options: dict[str, Any] | None = None,
                     fast_cpu_convs: bool = True) -> tuple[Classifier, Backbone]:
    """The classifier ``model`` on backbone ``backbone`` at the backbone's own output stride; ``options`` are
    the model's (e.g. ACoL's delta). ``fast_cpu_convs``: ``pipeline.models.convs`` (``classifier.fast_cpu_convs``)."""
    bb = create_backbone(backbone, pretrained, fast_cpu_convs=fast_cpu_convs)
    return MODELS[model](bb, num_classes, **(options or {})), bb


def classifier_state(net: Classifier, *, model: str, backbone: Backbone, backbone_name: str,
                     classes: list[str], background: bool, input_size: int) -> dict[str, Any]:
    """The checkpoint: weights + everything needed to use them (classes, backbone, normalisation)."""
    return {"model": model, "backbone": backbone_name, "output_stride": backbone.stride,
            "classes": list(classes), "background": background,
            "mean": list(backbone.mean), "std": list(backbone.std), "input_size": input_size,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def _retired(ckpt: dict[str, Any], backbone: Backbone) -> str | None:
    """Why a checkpoint of a removed option cannot be used (``docs/experiments.md#option-decisions-issue-28``):
    a model no longer built (``recam``), or a stride other than the backbone's own (``classifier.output_stride``)."""
    if ckpt.get("model") not in MODELS:
        return f"its model {ckpt.get('model')!r} is no longer one of {', '.join(MODELS)}"
    stride = ckpt.get("output_stride")  # absent in checkpoints from before the key: the backbone's own
    if stride is not None and stride != backbone.stride:
        return (f"it was trained at output stride {stride}, and classifiers now use the backbone's own "
                f"({backbone.stride})")
    return None


def load_classifier(path: Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: classifier checkpoint not found (run the train_classifier stage first)")
    why = None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        backbone = create_backbone(ckpt["backbone"], "none")
        why = _retired(ckpt, backbone)
        if why is None:
            net = MODELS[ckpt["model"]](backbone, len(ckpt["classes"]))
            net.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in torch.load, a foreign one on its keys
        raise UserError(f"{path}: not a readable classifier checkpoint ({first_line(exc)}); "
                        "rerun train_classifier with --force") from None
    if why is not None:
        raise UserError(f"{path}: {why}; rerun train_classifier with --force")
    net.requires_grad_(False)  # inference only: map methods take gradients w.r.t. inputs/activations
    return net.to(device).eval(), ckpt
