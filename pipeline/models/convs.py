"""Convolutions that compute exactly what ``nn.Conv2d`` does, with less work where PyTorch does more than needed.

What they replace: the dilated ``nn.Conv2d`` layers of a model (``exact_faster`` swaps them in place, keeping the
parameters, so state dicts and checkpoints are unchanged). When they are used: in the backbones of the
classifier and the segmenter (``create_backbone``) and in the segmenter's ASPP head; their written-out backward
runs where gradients are needed on CPU in fp32 (training on CPU). On CUDA, under autocast or without gradients
they compute as ``nn.Conv2d`` does (``AtrousConv2d`` without the taps that read only padding). The keys
``classifier.fast_cpu_convs`` and ``segmenter.fast_cpu_convs`` (false: plain ``nn.Conv2d``) turn them off.
Why: PyTorch's CPU backward of a dilated convolution is several times slower than its forward (oneDNN's dilated
weight gradient, and the dilated depthwise convolutions of an EfficientNet at output stride 16), so training
steps on CPU take less time with these (docs/experiments.md). ``tests/test_convs.py`` compares their outputs
and gradients with ``nn.Conv2d``'s.

- ``AtrousConv2d``: a stride-1 convolution with zero padding leaves out the taps that read only padding for
  the input at hand. An ASPP branch whose rate is not smaller than the feature map (rates 12 and 18 on the
  8 x 8 map of a 128-pixel input) is then the 1 x 1 convolution with its kernel's centre. Where a dilated
  kernel remains (rate 6 on 8 x 8), its weight gradient on CPU is written out: one matrix product per tap
  over the output window where the tap reads the input; oneDNN's forward and input gradient are kept.
- ``DilatedDepthwiseConv2d``: the backward pass of a dilated depthwise convolution on CPU. The input gradient
  is the same depthwise convolution with the kernel flipped (a forward, fast), the weight gradient one
  product-sum per tap over its window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tap_windows(size: int, kernel: int, dilation: int, padding: int) -> list[tuple[int, int, int, int]]:
    """Along one dimension of ``size``, the taps of a stride-1 convolution that read the input (not only
    padding) for some output position: ``(tap, lo, hi, offset)``, output positions [lo, hi) reading input
    positions [lo + offset, hi + offset)."""
    outputs = size + 2 * padding - dilation * (kernel - 1)
    windows = []
    for t in range(kernel):
        offset = t * dilation - padding
        lo, hi = max(0, -offset), min(outputs, size - offset)
        if hi > lo:
            windows.append((t, lo, hi, offset))
    return windows


def reading_taps(size: int, kernel: int, dilation: int, padding: int) -> tuple[int, int]:
    """The taps [t0, t1) of a stride-1 convolution along one dimension of ``size`` that read the input (not
    only padding) for some output position."""
    reads = [t for t, *_ in tap_windows(size, kernel, dilation, padding)]
    return (reads[0], reads[-1] + 1) if reads else (0, 0)


def _plain(conv: nn.Conv2d) -> bool:
    """Stride 1, numeric zero padding: what both classes below handle (else they run ``nn.Conv2d``'s)."""
    return conv.stride == (1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _written_backward(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` takes a backward written out here: on CPU in fp32 (no autocast), where
    gradients are needed, for stride 1 and zero padding."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    return needs_grad and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and _plain(conv)


CACHE_FLOATS = 2**18  # the depthwise weight gradient goes over the batch in groups of about this many values (1 MiB)


def _windows(x: torch.Tensor, shape: torch.Size, padding: tuple[int, int], dilation: tuple[int, int]):
    """Each tap (i, j) of a stride-1 convolution of ``x`` that reads the input, with its output window and
    the input window it reads: ``(i, j, out_rows, out_cols, in_rows, in_cols)`` as slices."""
    rows = tap_windows(x.shape[2], shape[2], dilation[0], padding[0])
    cols = tap_windows(x.shape[3], shape[3], dilation[1], padding[1])
    for i, y0, y1, oy in rows:
        for j, x0, x1, ox in cols:
            yield i, j, slice(y0, y1), slice(x0, x1), slice(y0 + oy, y1 + oy), slice(x0 + ox, x1 + ox)


def _dense_weight_grad(x: torch.Tensor, grad: torch.Tensor, shape: torch.Size, padding: tuple[int, int],
                       dilation: tuple[int, int]) -> torch.Tensor:
    """dL/dw of a stride-1 convolution (groups 1): for tap (i, j), one matrix product of the output gradient
    and the input it reads, over the output window where it reads the input (not padding)."""
    xl, g = x.permute(0, 2, 3, 1), grad.permute(0, 2, 3, 1)  # [N, H, W, C]: channels last, as views
    out = x.new_zeros((shape[0], shape[2], shape[3], shape[1]))  # [out, kh, kw, in]: a channels_last weight
    for i, j, oy, ox, iy, ix in _windows(x, shape, padding, dilation):
        out[:, i, j] = g[:, oy, ox].reshape(-1, shape[0]).t() @ xl[:, iy, ix].reshape(-1, shape[1])
    return out.permute(0, 3, 1, 2)


def _depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, shape: torch.Size, padding: tuple[int, int],
                           dilation: tuple[int, int]) -> torch.Tensor:
    """dL/dw of a stride-1 depthwise convolution: for tap (i, j), the sum of grad * the input it reads over
    the batch and the output window where it reads the input, per channel. The batch goes in groups small
    enough to stay in cache while their taps are summed."""
    xl, g = x.permute(0, 2, 3, 1), grad.permute(0, 2, 3, 1)
    n, h, w, channels = g.shape
    group = max(1, CACHE_FLOATS // (channels * h * w))
    out = x.new_zeros((shape[2], shape[3], channels))
    for s in range(0, n, group):
        xs, gs = xl[s:s + group], g[s:s + group]
        for i, j, oy, ox, iy, ix in _windows(x, shape, padding, dilation):
            out[i, j] += (xs[:, iy, ix] * gs[:, oy, ox]).sum((0, 1, 2))
    return out.permute(2, 0, 1).unsqueeze(1)


class _StrideOneConv(torch.autograd.Function):
    """A stride-1 convolution, dense or depthwise, with its backward written out: the input gradient is the
    transposed convolution (for a depthwise one, the same convolution with the kernel flipped), the weight
    gradient one product per tap over the windows where it reads the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.groups, ctx.has_bias = padding, dilation, groups, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        padding, dilation, groups = ctx.padding, ctx.dilation, ctx.groups
        depthwise = groups > 1
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] and depthwise:  # the transposed convolution of stride 1: the flipped kernel
            (ph, pw), (dh, dw), (kh, kw) = padding, dilation, weight.shape[2:]
            grad_x = F.conv2d(grad, weight.flip(2, 3), None, 1, (dh * (kh - 1) - ph, dw * (kw - 1) - pw),
                              (dh, dw), groups)
        elif ctx.needs_input_grad[0]:  # oneDNN's input gradient is fast; its dilated weight gradient is not
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], list(padding),
                                                         list(dilation), False, [0, 0], 1,
                                                         [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            weight_grad = _depthwise_weight_grad if depthwise else _dense_weight_grad
            grad_w = weight_grad(x, grad, weight.shape, padding, dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


class AtrousConv2d(nn.Conv2d):
    """``nn.Conv2d`` (dilated, groups 1) without its taps that read only padding for the input at hand: the
    same output and gradients (those taps multiply zeros), fewer multiply-adds. Where the taps that remain are
    not centred (the padding would not be symmetric), it runs in full. Where a dilated kernel remains, its
    backward on CPU is ``_StrideOneConv``'s (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _plain(self):
            return super().forward(x)
        weight, padding = self.weight, list(self.padding)
        for dim, size in enumerate(x.shape[-2:]):
            k, d, p = self.kernel_size[dim], self.dilation[dim], self.padding[dim]
            t0, t1 = reading_taps(size, k, d, p)
            if (t0, t1) != (0, k) and t0 == k - t1 and t1 > t0:
                weight = weight.narrow(2 + dim, t0, t1 - t0)
                padding[dim] = p - t0 * d
        dilated = any(weight.shape[2 + dim] > 1 and self.dilation[dim] > 1 for dim in (0, 1))
        if dilated and self.groups == 1 and _written_backward(self, x):
            return _StrideOneConv.apply(x, weight, self.bias, tuple(padding), self.dilation, 1)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


class DilatedDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (depthwise, stride 1, dilated) whose backward on CPU is ``_StrideOneConv``'s (module
    docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _written_backward(self, x):
            return super().forward(x)
        return _StrideOneConv.apply(x, self.weight, self.bias, self.padding, self.dilation, self.groups)


def _transposable_depthwise(conv: nn.Conv2d) -> bool:
    """Depthwise, with padding the flipped-kernel convolution of the input gradient can take."""
    return (conv.groups == conv.in_channels == conv.out_channels
            and all(conv.dilation[i] * (conv.kernel_size[i] - 1) >= conv.padding[i] for i in (0, 1)))


def as_class(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    """``conv`` as an instance of ``cls`` with the same parameters (the same tensors)."""
    out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
              conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
              dtype=conv.weight.dtype)
    out.weight, out.bias = conv.weight, conv.bias
    out.train(conv.training)
    return out


def exact_faster(model: nn.Module) -> nn.Module:
    """``model`` with each dilated depthwise ``nn.Conv2d`` as a ``DilatedDepthwiseConv2d`` and each other
    dilated one as an ``AtrousConv2d`` (in place; returns ``model``). Only modules of exactly ``nn.Conv2d`` are
    swapped: a subclass may compute something else."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is not nn.Conv2d or not _plain(child) or max(child.dilation) == 1:
                continue
            cls = DilatedDepthwiseConv2d if _transposable_depthwise(child) else AtrousConv2d
            setattr(parent, name, as_class(child, cls))
    return model
