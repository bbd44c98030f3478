"""U²-Net-p, the small U²-Net salient-object detector (Qin et al., "U²-Net: Going Deeper with Nested U-Structure
for Salient Object Detection", Pattern Recognition 2020), as a torch module, with its weights read from an ONNX
export of it.

The network is a U-Net of six stages whose every stage is itself a small U-Net (a residual U-block, ``RSU``): an
RSU-L block of depth L encodes with L-1 convolutions and max-pools, has one dilated convolution at the bottom,
decodes back up with skip connections, and adds its input convolution's output to the result. The last encoder
stages (RSU-4F) dilate instead of pooling. Each decoder stage (and the bottom) gives a side map through a 3×3
convolution; the six side maps, upsampled to the input size, are fused by a 1×1 convolution into the output.

The ONNX file (rembg's release of U²-Net-p) has its BatchNorm folded into the convolutions, so every
convolution here has a bias and no BatchNorm follows it. :func:`load_onnx_weights` assigns the file's convolutions,
in the graph's order, to this module's, in the order the forward pass runs them (the order they are declared in),
and refuses a file whose convolutions differ in number or in any shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, DataError


class ConvReLU(nn.Sequential):
    """U²-Net's REBNCONV (3×3 convolution, BatchNorm, ReLU) with the BatchNorm folded into the convolution."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1):
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


def _pooled(stages: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Each of ``stages`` on the previous one's output, with a 2×2 max-pool (ceil mode) between two stages: the
    encoder of an RSU block and of the whole network. -> every stage's output, shallowest first."""
    outs, h = [], x
    for i, stage in enumerate(stages):
        h = stage(F.max_pool2d(h, 2, 2, ceil_mode=True) if i else h)
        outs.append(h)
    return outs


class RSU(nn.Module):
    """Residual U-block RSU-``depth``: ``depth`` - 1 encoder convolutions with a 2×2 max-pool (ceil mode) between
    them, a dilated bottom, ``depth`` - 1 decoder convolutions on [upsampled deeper output, skip]."""

    def __init__(self, depth: int, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.conv_in = ConvReLU(in_ch, out_ch)
        self.encoder = nn.ModuleList([ConvReLU(out_ch, mid_ch)] + [ConvReLU(mid_ch, mid_ch) for _ in range(depth - 2)])
        self.bottom = ConvReLU(mid_ch, mid_ch, dilation=2)
        self.decoder = nn.ModuleList([ConvReLU(2 * mid_ch, mid_ch) for _ in range(depth - 2)]
                                     + [ConvReLU(2 * mid_ch, out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.conv_in(x)
        skips = _pooled(self.encoder, x_in)
        h = self.bottom(skips[-1])
        for conv, skip in zip(self.decoder, reversed(skips), strict=True):
            h = conv(torch.cat([_up(h, skip), skip], 1))
        return h + x_in


class RSU4F(nn.Module):
    """RSU-4F: the RSU-4 of the deepest stages with dilations 1, 2, 4, 8 in place of pooling."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.conv_in = ConvReLU(in_ch, out_ch)
        self.encoder = nn.ModuleList([ConvReLU(out_ch, mid_ch), ConvReLU(mid_ch, mid_ch, 2),
                                      ConvReLU(mid_ch, mid_ch, 4)])
        self.bottom = ConvReLU(mid_ch, mid_ch, dilation=8)
        self.decoder = nn.ModuleList([ConvReLU(2 * mid_ch, mid_ch, 4), ConvReLU(2 * mid_ch, mid_ch, 2),
                                      ConvReLU(2 * mid_ch, out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.conv_in(x)
        skips, h = [], x_in
        for conv in self.encoder:
            h = conv(h)
            skips.append(h)
        h = self.bottom(h)
        for conv, skip in zip(self.decoder, reversed(skips), strict=True):
            h = conv(torch.cat([h, skip], 1))
        return h + x_in


class U2NetP(nn.Module):
    """U²-Net-p: ``forward(x [B, 3, H, W])`` -> the fused saliency logits ``[B, 1, H, W]`` (sigmoid: the map).
    Its weights were trained at 320×320 on RGB scaled to [0, 1] by the image's maximum and normalised with
    ImageNet's mean and std."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([RSU(7, 3, 16, 64), RSU(6, 64, 16, 64), RSU(5, 64, 16, 64), RSU(4, 64, 16, 64),
                                      RSU4F(64, 16, 64), RSU4F(64, 16, 64)])
        self.decoder = nn.ModuleList([RSU4F(128, 16, 64), RSU(4, 128, 16, 64), RSU(5, 128, 16, 64),
                                      RSU(6, 128, 16, 64), RSU(7, 128, 16, 64)])
        self.side = nn.ModuleList([nn.Conv2d(64, 1, 3, padding=1) for _ in range(6)])
        self.fuse = nn.Conv2d(6, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = _pooled(self.encoder, x)
        h = skips[-1]
        decoded = [h]  # the bottom stage's output, then each decoder stage's, deepest first
        for stage, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            h = stage(torch.cat([_up(h, skip), skip], 1))
            decoded.append(h)
        finest = decoded[-1]
        # side maps from the finest decoder output (side 1) to the bottom (side 6), at the finest resolution
        sides = [_up(conv(d), finest) for conv, d in zip(self.side, reversed(decoded), strict=True)]
        return self.fuse(torch.cat(sides, 1))


def load_onnx_weights(net: U2NetP, path: Path) -> U2NetP:
    """Load the convolutions of the ONNX export ``path`` of U²-Net-p into ``net`` (BatchNorm folded: weight and
    bias of each ``Conv`` node, in graph order). A file whose convolutions do not match in number and shapes is a
    ``DataError`` naming it; without the ``onnx`` package, a ``ConfigError`` says what to install."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ConfigError("config key 'saliency.enabled': reading U²-Net-p's weights needs the onnx package; install "
                          "the saliency extra: pip install -e '.[saliency]'") from None

    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise DataError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    init = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "Conv"]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if len(nodes) != len(convs):
        raise DataError(f"{path}: {len(nodes)} convolutions, U²-Net-p has {len(convs)}: not a U²-Net-p export")
    state = {}
    for node, conv in zip(nodes, convs, strict=True):
        for name, param in zip(node.input[1:], (conv.weight, conv.bias), strict=True):
            if name not in init:
                raise DataError(f"{path}: convolution {node.name or name} takes a computed weight, not a stored one")
            value = torch.from_numpy(numpy_helper.to_array(init[name]).copy())
            if value.shape != param.shape:
                raise DataError(f"{path}: a convolution of shape {tuple(value.shape)} where U²-Net-p has "
                                f"{tuple(param.shape)}: not a U²-Net-p export")
            state[id(param)] = value
    with torch.no_grad():
        for conv in convs:
            conv.weight.copy_(state[id(conv.weight)])
            conv.bias.copy_(state[id(conv.bias)])
    return net
