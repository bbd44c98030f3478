"""Inference copies of a classifier: BatchNorm folded into the convolution before it, channels_last.

What it replaces: the model's own forward, in which every BatchNorm after a convolution is a second pass over
its feature map. When it is used: the map methods run on the classifier's inference copy
(``pipeline/maps/generate.py``; Score-CAM and SS-CAM, which run many forwards per image, make one when called
on the model itself), as do the faithfulness probe and the segmenter's predictions. ``maps.fold_batchnorm:
false`` (``inference_copy(..., fold=False)``) keeps the BatchNorms in make_maps' copy: the same copy, unfolded.
Why: the forwards are faster on CPU (docs/experiments.md); ``tests/test_fold.py`` compares folded and unfolded
outputs.

In eval mode a BatchNorm is an affine map per channel, y = (x - mean) * s + beta with
s = gamma / sqrt(var + eps). When it directly follows a convolution (w, b), the two are one convolution:
w' = w * s (per output channel), b' = (b - mean) * s + beta.

Which BatchNorm follows which convolution is read from the module tree (a convolution and the
BatchNorm registered right after it in the same parent, as torchvision's ResNets and timm's
EfficientNets are written), not from a trace: torch.fx cannot trace timm's same-padding convolutions.
So the copy is checked: it must give the model's scores on a probe input, or the unfolded
(channels_last) copy is used instead.

A map method calls for the copy once per batch of images; the last one made is kept per model (weakly) and
handed out again while the model's parameters and buffers are the same tensors at the same versions (an
in-place update, ``load_state_dict`` included, bumps a version), on the same device and dtypes, in eval mode.
A copy asked for its own inference copy is handed back as it is.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

_COPIES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()
_MADE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the copies handed out


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    shift = (bias - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0.0)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(shift, requires_grad=False)


def _what_remains(bn: nn.BatchNorm2d) -> nn.Module | None:
    """The module that replaces a folded BatchNorm: nothing, or the dropout + activation of timm's
    BatchNormAct2d; None for another subclass, whose extra behaviour is unknown."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if hasattr(bn, "act") and hasattr(bn, "drop") and type(bn).__name__ == "BatchNormAct2d":
        return nn.Sequential(bn.drop, bn.act)
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``model`` with every BatchNorm that follows a convolution folded into it."""
    folded = copy.deepcopy(model).eval()
    for parent in list(folded.modules()):
        names = list(parent._modules)
        for conv_name, bn_name in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.num_features == conv.out_channels):
                continue
            remains = _what_remains(bn)
            if remains is not None:
                _fold_into(conv, bn)
                parent._modules[bn_name] = remains
    return folded


def _state_key(model: nn.Module, rtol: float, fold: bool) -> tuple:
    """What the copy depends on: every parameter and buffer (identity, storage, version, device, dtype)."""
    tensors = [*model.parameters(), *model.buffers()]
    return (model.training, rtol, fold, *((id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in tensors))


@torch.no_grad()
def inference_copy(model: nn.Module, probe: torch.Tensor, rtol: float = 1e-4, fold: bool = True) -> nn.Module:
    """A frozen channels_last copy of ``model`` for forward-only use, BatchNorm folded (with ``fold``) when that
    gives the model's scores on ``probe`` (a [1,3,H,W] input) within ``rtol`` of their scale. ``model`` is left
    as is; the copy is shared by the calls made while the model stays the same (module docstring)."""
    if model in _MADE:
        return model
    key = _state_key(model, rtol, fold)
    cached = _COPIES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    made = _make_copy(model, probe, rtol, fold)
    _COPIES[model] = (key, made)
    _MADE.add(made)
    return made


def _make_copy(model: nn.Module, probe: torch.Tensor, rtol: float, fold: bool) -> nn.Module:
    if fold and not model.training:  # (in training mode BatchNorm uses the batch's statistics: nothing to fold)
        probe = probe.float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(probe.device.type, enabled=False):
            expected = model(probe).float()
            folded = fold_batchnorm(model).to(memory_format=torch.channels_last)
            error = (folded(probe).float() - expected).abs().max()
        if error <= rtol * (1.0 + expected.abs().max()):
            return folded.requires_grad_(False)
    return copy.deepcopy(model).to(memory_format=torch.channels_last).requires_grad_(False)
