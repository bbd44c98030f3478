"""Convolutions that compute exactly what ``nn.Conv2d`` does, with less work where PyTorch does more than needed.

- ``AtrousConv2d``: a stride-1 convolution with zero padding leaves out the taps that read only padding for
  the input at hand. An ASPP branch whose rate is not smaller than the feature map (rates 12 and 18 on the
  8 x 8 map of a 128-pixel input) is then the 1 x 1 convolution with its kernel's centre.
- ``DilatedDepthwiseConv2d``: the backward pass of a dilated depthwise convolution on CPU, where PyTorch's
  takes several times its forward and the same pass undilated (1152 channels, 5 x 5, dilation 2, batch 8 at
  8 x 8: 38 ms against 7.6 ms here). The input gradient is the same depthwise convolution with the kernel
  flipped (a forward, fast), the weight gradient one product-sum per tap. These are the last stages of a
  backbone at output stride 16 (timm's EfficientNets), which the classifier and the segmenter train: a
  training step of either took 1.16-1.32x less time (with ``AtrousConv2d`` in the segmenter's head).

Both keep ``nn.Conv2d``'s parameters, so state dicts and checkpoints are unchanged; ``exact_faster`` swaps
them into a model in place of the convolutions they apply to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reading_taps(size: int, kernel: int, dilation: int, padding: int) -> tuple[int, int]:
    """The taps [t0, t1) of a stride-1 convolution along one dimension of ``size`` that read the input (not
    only padding) for some output position."""
    outputs = size + 2 * padding - dilation * (kernel - 1)
    reads = [t for t in range(kernel) if t * dilation - padding < size and t * dilation - padding + outputs > 0]
    return (reads[0], reads[-1] + 1) if reads else (0, 0)


def _plain(conv: nn.Conv2d) -> bool:
    """Stride 1, numeric zero padding: what both classes below handle (else they run ``nn.Conv2d``'s)."""
    return conv.stride == (1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


class AtrousConv2d(nn.Conv2d):
    """``nn.Conv2d`` without its taps that read only padding for the input at hand: the same output and
    gradients (those taps multiply zeros), fewer multiply-adds. Where the taps that remain are not centred
    (the padding would not be symmetric), it runs in full."""

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
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


CACHE_FLOATS = 2**18  # the weight gradient goes over the batch in groups of about this many input values (1 MiB)


def _depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, shape: torch.Size, padding: tuple[int, int],
                           dilation: tuple[int, int]) -> torch.Tensor:
    """dL/dw of a stride-1 depthwise convolution: for tap (i, j), the sum over the batch and the output
    positions of grad * (the padded input shifted by the tap), per channel. The batch goes in groups small
    enough to stay in cache while their taps are summed."""
    (ph, pw), (dh, dw) = padding, dilation
    channels, _, kh, kw = shape
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # [N, H', W', C]: channels last, as a view
    g = grad.permute(0, 2, 3, 1)
    n, h, w = g.shape[:3]
    group = max(1, CACHE_FLOATS // (channels * h * w))
    out = x.new_zeros((kh * kw, channels))
    for s in range(0, n, group):
        xs, gs = padded[s:s + group], g[s:s + group]
        for i in range(kh):
            for j in range(kw):
                out[i * kw + j] += (xs[:, i * dh:i * dh + h, j * dw:j * dw + w] * gs).sum((0, 1, 2))
    return out.t().reshape(shape)


class _DepthwiseConv(torch.autograd.Function):
    """Stride-1 depthwise convolution with its backward written out (``DilatedDepthwiseConv2d``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        (ph, pw), (dh, dw) = ctx.padding, ctx.dilation
        channels, _, kh, kw = weight.shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the transposed convolution of stride 1: the flipped kernel
            grad_x = F.conv2d(grad, weight.flip(2, 3), None, 1, (dh * (kh - 1) - ph, dw * (kw - 1) - pw),
                              (dh, dw), channels)
        if ctx.needs_input_grad[1]:
            grad_w = _depthwise_weight_grad(x, grad, weight.shape, (ph, pw), (dh, dw))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class DilatedDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (depthwise, stride 1, dilated) whose backward on CPU is ``_DepthwiseConv``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not needs_grad or x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not _plain(self):
            return super().forward(x)
        return _DepthwiseConv.apply(x, self.weight, self.bias, self.padding, self.dilation)


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
