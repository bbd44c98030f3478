"""Score-CAM's masked forwards with the model's first convolution computed once per image, not once per mask.

The masked input of channel k is M^k = X_b + H^k * D, with D = X - X_b and H^k = s(U(A^k)) (module
``pipeline.maps.scorecam``). H^k is affine in the h x w values of A^k: the bilinear upsampling U is linear,
U(A^k) = sum_p A^k_p U(e_p) over the grid points p (e_p: the indicator of p), and the min-max normalisation s
subtracts lo_k and divides by (hi_k - lo_k), the min and max of U(A^k). A model whose first layer is a
convolution (weights W, bias b; its zero padding is linear too) therefore starts every masked forward with

    conv(M^k) = conv(X_b) + sum_p c_kp W(U(e_p) * D) - d_k W(D),
    c_kp = A^k_p / (hi_k - lo_k),   d_k = lo_k / (hi_k - lo_k)

so h*w + 1 convolutions per image (the basis; ``conv(X_b)`` makes h*w + 2 maps) and, per masked input, one
row of a matrix product with h*w + 2 terms replace a convolution of C_in * kh * kw multiply-adds per output
value; the rest of the model runs as usual from there. That pays when the grid is small against the stem's
kernel: a ResNet's 7 x 7 x 3 stem (147) with its 3 x 3 or 7 x 7 ``layer4`` (11 or 51 basis maps) does, an
EfficientNet's 3 x 3 x 3 stem (27) with its 8 x 8 features (66) does not (``cheaper``: at most half as many
terms as the kernel). It holds for Score-CAM only: SS-CAM's noise is not in the span of the basis.

The rest of the model is the model with that convolution replaced by the identity, fed the convolution's
output as its input (nothing runs on the input before that convolution: checked with hooks). The
substitution is checked as the BatchNorm fold is: on two masked inputs the model must give the same scores
through the basis as through its stem, within 1e-4 of their scale, or the plain path is used.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maps.ops import upsampled_channels

log = logging.getLogger(__name__)
RTOL = 1e-4


def first_convolution(model: nn.Module, probe: torch.Tensor) -> str | None:
    """The name of the module that ``model``'s forward calls first, if it is a convolution of the input itself
    (nothing runs on the input before it); else None."""
    first: list[tuple[nn.Module, bool]] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if not first and not module._modules:
            first.append((module, bool(args) and args[0] is probe))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        model(probe)
    finally:
        for handle in handles:
            handle.remove()
    if not first or not first[0][1] or not isinstance(first[0][0], nn.Conv2d) or first[0][0].groups != 1:
        return None
    return next(name for name, m in model.named_modules() if m is first[0][0])


def without(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model``'s modules with ``name`` replaced by the identity, sharing its tensors."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    rest = copy.deepcopy(model, memo)
    rest.set_submodule(name, nn.Identity())
    return rest


def grid_basis(grid: tuple[int, int], size: torch.Size, device: torch.device) -> torch.Tensor:
    """U(e_p) for every point p of an h x w grid: [h*w, 1, H, W], the upsampling the masks use."""
    h, w = grid
    eye = torch.eye(h * w, device=device).view(h * w, 1, h, w)
    return F.interpolate(eye, size=size, mode="bilinear", align_corners=False)


class StemBasis:
    """Scores of the masked inputs of (image, channel) rows, their first convolution from the basis. The rest
    of the model (the model with its first convolution replaced by the identity) takes the convolution's
    output as its input; calls share no state, so they may run side by side."""

    def __init__(self, rest: nn.Module, basis: torch.Tensor, out_shape: torch.Size, acts: torch.Tensor,
                 size: torch.Size):
        self.rest, self.acts, self.size = rest, acts, size
        self.basis = basis  # [B, h*w + 2, h' * w' * C_out]: the stem's output maps, channels last, flattened
        self.out_shape = out_shape  # the stem's output [C_out, h', w']

    @staticmethod
    def cheaper(conv: nn.Conv2d, acts: torch.Tensor) -> bool:
        """Whether the basis is cheaper than ``conv``: at most half as many terms as the kernel has weights."""
        terms = acts.shape[-2] * acts.shape[-1] + 2
        return 2 * terms <= conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, images: torch.Tensor, x_b: torch.Tensor, acts: torch.Tensor,
              masked: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              only_if_cheaper: bool = True) -> StemBasis | None:
        """For ``model`` (an inference copy, left as it is), or None when its first layer is not a convolution
        of the input, the basis is not ``cheaper`` than it (with ``only_if_cheaper``) or the scores through the
        basis differ from the model's. ``x_b``: the baseline [B,3,H,W]; ``acts``: A [B,K,h,w]; ``masked``:
        (b, k) -> the masked inputs of those rows (the check)."""
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if only_if_cheaper and not any(cls.cheaper(m, acts) for m in convs):
            return None  # whichever convolution comes first: no probe forward needed to know
        name = first_convolution(model, images[:1].contiguous(memory_format=torch.channels_last))
        if name is None:
            return None
        conv = model.get_submodule(name)
        if only_if_cheaper and not cls.cheaper(conv, acts):
            return None
        size = images.shape[-2:]
        with torch.autocast(images.device.type, enabled=False):
            units = grid_basis(acts.shape[-2:], size, images.device)  # [h*w, 1, H, W]
            bias = 0.0 if conv.bias is None else conv.bias.view(1, -1, 1, 1)
            maps = []
            for x, xb in zip(images.float(), x_b.float(), strict=True):
                d = (x - xb)[None]
                inputs = torch.cat([units * d, d], 0).contiguous(memory_format=torch.channels_last)
                linear = conv(inputs) - bias  # W(U(e_p) * D) for every p, then W(D)
                maps.append(torch.cat([linear, conv(xb[None])], 0).permute(0, 2, 3, 1).flatten(1))
        found = cls(without(model, name), torch.stack(maps), linear.shape[1:], acts, size)
        try:
            agrees = found._agrees(model, masked)
        except RuntimeError:  # the model reads its input past the first layer
            agrees = False
        if not agrees:
            log.debug("stem basis: scores differ from the model's, using the plain masked forwards")
            return None
        return found

    def coefficients(self, b: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[R, h*w + 2]: (c_kp over p, -d_k, 1) of every row, with the masks' normalisation."""
        _, lo, span = upsampled_channels(self.acts, b, k, self.size)
        lo, span = lo.flatten(1), span.flatten(1)
        return torch.cat([self.acts[b, k].flatten(1) / span, -lo / span, torch.ones_like(lo)], 1)

    def __call__(self, b: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The model's scores [R, C] of the masked inputs of rows (b, k); rows of one image are contiguous."""
        c, h, w = self.out_shape
        coef = self.coefficients(b, k)
        out = coef.new_empty((b.numel(), h * w * c))
        images, counts = torch.unique_consecutive(b, return_counts=True)
        start = 0
        with torch.autocast(coef.device.type, enabled=False):
            for image, count in zip(images.tolist(), counts.tolist(), strict=True):
                torch.mm(coef[start:start + count], self.basis[image], out=out[start:start + count])
                start += count
        return self.rest(out.view(-1, h, w, c).permute(0, 3, 1, 2))  # channels_last [R, C_out, h', w']

    def _agrees(self, model: nn.Module, masked: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
        flat = self.acts[:1].flatten(2)
        k = (flat.amax(2) - flat.amin(2))[0].topk(min(2, flat.shape[1])).indices  # the most varying channels
        b = torch.zeros_like(k)
        x = masked(b, k).float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, enabled=False):
            expected = model(x).float()
            got = self(b, k).float()
        return bool((got - expected).abs().max() <= RTOL * (1.0 + expected.abs().max()))
