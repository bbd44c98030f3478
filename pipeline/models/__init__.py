"""Models: backbones by name, the classifiers (CAM, ACoL, ReCAM), and their checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError, first_line
from pipeline.models.acol_net import ACoLNet
from pipeline.models.backbones import BACKBONES, Backbone, create_backbone
from pipeline.models.cam_net import CAMNet
from pipeline.models.recam_net import ReCAMNet

__all__ = ["ACoLNet", "BACKBONES", "Backbone", "CAMNet", "ReCAMNet", "build_classifier", "load_classifier",
           "classifier_state"]

MODELS = {"cam": CAMNet, "acol": ACoLNet, "recam": ReCAMNet}


def build_classifier(model: str, backbone: str, pretrained: str, num_classes: int,
                     options: dict[str, Any] | None = None,
                     output_stride: int | None = None) -> tuple[nn.Module, Backbone]:
    """The classifier ``model`` on backbone ``backbone``; ``options`` are the model's (e.g. ACoL's delta)."""
    bb = create_backbone(backbone, pretrained, output_stride)
    return MODELS[model](bb, num_classes, **(options or {})), bb


def classifier_state(net: nn.Module, *, model: str, backbone: Backbone, backbone_name: str,
                     classes: list[str], background: bool, input_size: int) -> dict[str, Any]:
    """The checkpoint: weights + everything needed to use them (classes, backbone, normalisation)."""
    return {"model": model, "backbone": backbone_name, "output_stride": backbone.stride,
            "classes": list(classes), "background": background,
            "mean": list(backbone.mean), "std": list(backbone.std), "input_size": input_size,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def load_classifier(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: classifier checkpoint not found (run the train_classifier stage first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        # checkpoints from before classifier.output_stride are at the backbone's own stride
        net, _ = build_classifier(ckpt["model"], ckpt["backbone"], "none", len(ckpt["classes"]),
                                  output_stride=ckpt.get("output_stride"))
        net.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in torch.load, a foreign one on its keys
        raise UserError(f"{path}: not a readable classifier checkpoint ({first_line(exc)}); "
                        "rerun train_classifier with --force") from None
    net.requires_grad_(False)  # inference only: map methods take gradients w.r.t. inputs/activations
    return net.to(device).eval(), ckpt
